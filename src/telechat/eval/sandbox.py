"""Run model-written Python in a confined child process.

Each program runs in a fresh `python -I` that a trusted bootstrap (`_BOOT` below) confines before
any program code runs, with the kernel's mechanisms, each where the kernel grants it:
- namespaces (user when not root, mount, PID, network, IPC, UTS): the program sees a private,
  read-only file tree holding only what the interpreter needs (/usr, /lib*, the Python prefixes,
  /etc/ld.so.cache, a few /dev nodes, a fresh /proc of its own PID namespace) and its working
  directory, a size-bounded tmpfs and the one writable place; no network; no other process;
- started as root, the program runs as uid 65534 (nobody); capabilities are dropped in any case;
- Landlock: reads limited to the same paths, writes to the work dir; TCP, signals and abstract
  sockets to outside the sandbox denied (as far as the kernel's Landlock version goes);
- a seccomp filter: no fork/vfork/execve/clone of processes (threads are fine), no signals to
  other processes (kill/tgkill, SIGIO owners by F_SETOWN or the FIOSETOWN/SIOCSPGRP ioctls), no
  ptrace, no sockets (only AF_UNIX socketpair), no mount/unshare/setns/bpf/io_uring/keyctl;
- rlimits (memory, CPU seconds, file size, open files, no core dumps), PR_SET_PDEATHSIG, and the
  parent kills the whole process group at the wall-clock timeout; in a PID namespace the kernel
  also kills every process of the namespace when its init (the bootstrap's supervisor) dies.
Where the kernel refuses a mechanism (no user namespaces, an old kernel, a container's seccomp
profile) the others still apply; `Outcome.confinement` and `sandbox_capabilities()` list what was
actually applied, never more.

The verdict comes from a supervisor process that the program never runs in: it reports the
program's exit status or signal on a pipe the program does not hold, never from the output. A
program passes only when it exits with `FINISHED`, the status the bootstrap uses after the program
ran to its end, so an early `sys.exit(0)`/`os._exit(0)` or `SystemExit(FINISHED)` is a failure.
Residual limit: a program that deliberately calls `os._exit(FINISHED)` (or returns an object whose
`__eq__` always says True) is counted as passed; the sandbox confines programs, it cannot judge
intent.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

FINISHED = 87  # the bootstrap's exit status after the program ran to its end
SANDBOX_UID = 65534  # nobody: the uid programs run as when the sandbox is started as root

# The bootstrap runs as `python -I -c _BOOT CONFIG`. Process B (this one) enters new namespaces and
# forks C, the supervisor (PID 1 of the new PID namespace), which builds the file tree and forks D,
# which drops privileges, installs Landlock and seccomp and runs the program. C reports D's end on
# the status pipe. Nothing here is secret: the program may read all of it.
_BOOT = r'''
import ctypes, json, os, resource, signal, struct, sys

CFG = json.loads(sys.argv[1])
LINUX = sys.platform.startswith("linux")  # elsewhere only the rlimits and the supervisor apply
libc = ctypes.CDLL(None, use_errno=True)
if LINUX:
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
    libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.argtypes = (ctypes.c_int,) + (ctypes.c_ulong,) * 4
L = ctypes.c_long
applied = []

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
KEEP_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048 | (1 << 21)  # flags locked on mounts from outside
NS = (("user", 0x10000000), ("mount", 0x00020000), ("pid", 0x20000000), ("net", 0x40000000),
      ("ipc", 0x08000000), ("uts", 0x04000000))
ARCH = {"x86_64": dict(audit=0xc000003e, fork=57, vfork=58, execve=59, execveat=322, clone=56, kill=62, tkill=200,
                       tgkill=234, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, ptrace=101, process_vm_readv=310,
                       process_vm_writev=311, fcntl=72, ioctl=16, socket=41, socketpair=53, prctl=157, setsid=112,
                       setpgid=109, mount=165, umount2=166, pivot_root=155, chroot=161, unshare=272, setns=308,
                       bpf=321, perf_event_open=298, keyctl=250, add_key=248, request_key=249, userfaultfd=323,
                       open_by_handle_at=304,
                       name_to_handle_at=303, kexec_load=246, kexec_file_load=320, init_module=175,
                       finit_module=313, delete_module=176, reboot=169, swapon=167, swapoff=168, acct=163,
                       quotactl=179),
        "aarch64": dict(audit=0xc00000b7, execve=221, execveat=281, clone=220, kill=129, tkill=130, tgkill=131,
                        rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, ptrace=117, process_vm_readv=270,
                        process_vm_writev=271, fcntl=25, ioctl=29, socket=198, socketpair=199, prctl=167, setsid=157,
                        setpgid=154,
                        mount=40, umount2=39, pivot_root=41, chroot=51, unshare=97, setns=268, bpf=280,
                        perf_event_open=241, keyctl=219, add_key=217, request_key=218, userfaultfd=282,
                        open_by_handle_at=265, name_to_handle_at=264, kexec_load=104, kexec_file_load=294,
                        init_module=105, finit_module=273, delete_module=106, reboot=142, swapon=224, swapoff=225,
                        acct=89, quotactl=60)}
COMMON = dict(pidfd_send_signal=424, io_uring_setup=425, io_uring_enter=426, io_uring_register=427, open_tree=428,
              move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433, pidfd_open=434, clone3=435,
              pidfd_getfd=438, mount_setattr=442)


def check(ret, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), f"mount {src} on {dst}")


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces():
    """Process B: unshare each namespace the kernel grants (a user namespace first when not root)."""
    got = set()
    root = os.geteuid() == 0
    if CFG["drop_root_first"] and root:  # behave exactly as an ordinary user would
        os.setgroups([])
        os.setresgid(CFG["uid"], CFG["uid"], CFG["uid"])
        os.setresuid(CFG["uid"], CFG["uid"], CFG["uid"])
        libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, so that we may write our own uid_map
        root = False
    uid, gid = os.geteuid(), os.getegid()
    for name, flag in NS if LINUX else ():
        if name == "user" and root:
            continue
        if libc.unshare(flag) != 0:
            if name == "user":
                break  # without it an unprivileged process gets no other namespace
            continue
        if name == "user":
            try:
                write_file("/proc/self/setgroups", "deny")
                write_file("/proc/self/uid_map", f"{uid} {uid} 1")
                write_file("/proc/self/gid_map", f"{gid} {gid} 1")
            except OSError:
                break  # e.g. a security module that allows the namespace but not the mapping
        got.add(name)
    applied.extend(n + "-ns" for n, _ in NS if n in got)
    return got, root


def bind(src, dst, writable=False, device=False):
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    mount(src, dst, None, MS_BIND | MS_REC)
    keep = os.statvfs(dst).f_flag & KEEP_FLAGS
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | keep | (0 if writable else MS_RDONLY)
    if not device:
        flags |= MS_NODEV
    mount(None, dst, None, flags)


def build_root(got):
    """Supervisor C: a read-only tmpfs root holding only what Python needs, then pivot_root into it."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount reaches the outside
    new = CFG["root"]
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4m,nr_inodes=4096")
    os.mkdir(new + "/.old")
    check(libc.syscall(L(PIVOT_ROOT), new.encode(), (new + "/.old").encode()), "pivot_root")
    os.chdir("/")
    for path, real in CFG["ro"]:
        if os.path.lexists(path) or not os.path.exists("/.old" + real):
            continue  # already there through an earlier entry, or absent (or out of our reach)
        if os.path.dirname(path) == "/" and os.path.islink("/.old" + path):  # e.g. /lib -> usr/lib
            os.symlink(os.readlink("/.old" + path), path)
            continue
        bind("/.old" + real, path)
    os.makedirs("/dev", exist_ok=True)
    for dev in CFG["devices"]:
        if os.path.exists("/.old" + dev):
            bind("/.old" + dev, dev, device=True)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, "/dev/" + name)
    # The work dir: a tmpfs of its own, so that the disk use is bounded too.
    os.makedirs(CFG["work"])
    mount("tmpfs", CFG["work"], "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0755,size={CFG['work_mb']}m,nr_inodes=4096")
    with open("/.old" + CFG["work_real"] + "/program.py", "rb") as src, open(CFG["work"] + "/program.py", "wb") as dst:
        dst.write(src.read())
    if "pid" in got:
        os.mkdir("/proc")
        try:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            applied.append("fresh-proc")
        except OSError:
            pass  # e.g. a container whose /proc is partly masked: then no /proc at all
    check(libc.umount2(b"/.old", 2), "umount /.old")  # MNT_DETACH
    os.rmdir("/.old")
    mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    applied.append("private-root")


def drop_privileges(root):
    """Where the kernel refuses a step, go on without it and do not claim it."""
    if root:
        try:
            os.chown(CFG["work"], CFG["uid"], CFG["uid"])
            os.setgroups([])
            os.setresgid(CFG["uid"], CFG["uid"], CFG["uid"])
            os.setresuid(CFG["uid"], CFG["uid"], CFG["uid"])
            applied.append(f"uid-{CFG['uid']}")
        except (OSError, AttributeError):  # AttributeError: no setresuid outside Linux
            pass
    # Capabilities held in a user namespace of our own are dropped too (we never exec, which would).
    if LINUX and libc.capset(struct.pack("Ii", 0x20080522, 0), bytes(24)) == 0:
        libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
        applied.append("no-capabilities")


def landlock(paths):
    """Limit file access to `paths` (read) and the work dir (all), TCP and signals to inside."""
    abi = libc.syscall(L(444), None, L(0), L(1))  # landlock_create_ruleset(NULL, 0, VERSION)
    if abi < 1:
        return
    fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    attr = struct.pack("QQQ", fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)[:8 * (1 + (abi >= 4) + (abi >= 6))]
    rs = libc.syscall(L(444), attr, L(len(attr)), L(0))
    if rs < 0:
        return
    file_only = 1 | 2 | 4 | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    rules = [(p, 1 | 4 | 8) for p in paths] + [(p, 2 | 4 | (1 << 14 if abi >= 3 else 0)) for p in CFG["devices"]]
    rules.append((CFG["work"], fs))
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # absent: nothing to allow
            try:
                if not os.path.isdir(path):
                    access &= file_only
                if libc.syscall(L(445), L(rs), L(1), struct.pack("=Qi", access, fd), L(0)) != 0:
                    return  # restricting without this rule could break the interpreter
            finally:
                os.close(fd)
        if libc.syscall(L(446), L(rs), L(0)) == 0:
            applied.append(f"landlock-abi{abi}")
    finally:
        os.close(rs)


def seccomp():
    nrs = ARCH.get(os.uname().machine)
    if nrs is None:
        return
    nrs = {**nrs, **COMMON}
    ld = lambda off: struct.pack("HBBI", 0x20, 0, 0, off)
    jeq = lambda k, jt, jf: struct.pack("HBBI", 0x15, jt, jf, k)
    ret = lambda k: struct.pack("HBBI", 0x06, 0, 0, k)
    allow, eperm, enosys, kill = ret(0x7fff0000), ret(0x00050001), ret(0x00050026), ret(0x80000000)
    me = os.getpid()
    only_self = [ld(16), jeq(me, 0, 1), allow, eperm]  # arg0 (a pid) must be this process
    body = {
        "clone": [ld(16), struct.pack("HBBI", 0x45, 0, 1, 0x00010000), allow, eperm],  # CLONE_THREAD: a thread
        "clone3": [enosys],  # glibc then falls back to clone, checked above
        "kill": only_self, "tkill": only_self, "tgkill": only_self, "rt_sigqueueinfo": only_self,
        "rt_tgsigqueueinfo": only_self,
        "socketpair": [ld(16), jeq(1, 0, 1), allow, eperm],  # AF_UNIX pairs only (asyncio needs one)
        "prctl": [ld(16), jeq(1, 0, 1), eperm, allow],  # not PR_SET_PDEATHSIG
        "fcntl": [ld(24), jeq(8, 2, 0), jeq(15, 1, 0), allow, eperm],  # no F_SETOWN(_EX): SIGIO to others
        "ioctl": [ld(24), jeq(0x8901, 2, 0), jeq(0x8902, 1, 0), allow, eperm],  # nor FIOSETOWN/SIOCSPGRP
    }
    prog = [ld(4), jeq(nrs["audit"], 1, 0), kill, ld(0)]
    if "fork" in nrs:  # x86_64: no x32 system calls
        prog += [struct.pack("HBBI", 0x35, 0, 1, 0x40000000), kill]
    for name, nr in nrs.items():
        if name == "audit":
            continue
        rule = body.get(name, [eperm])
        prog += [jeq(nr, 0, len(rule))] + rule
    prog.append(allow)
    code = b"".join(prog)
    buf = ctypes.create_string_buffer(code)
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(buf)))
    check(libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0), "seccomp")  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    applied.append("seccomp")


def confine(root, got):
    """Process D, before any program code: the last steps of confinement, in an order that works."""
    os.close(CFG["status_fd"])
    os.chdir(CFG["work"])
    drop_privileges(root)
    if LINUX:
        check(libc.prctl(1, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")  # after the uid change, which clears it
    for what, value in ((resource.RLIMIT_CPU, CFG["cpu"]), (resource.RLIMIT_FSIZE, CFG["fsize"]),
                        (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_AS, CFG["mem"])):
        if value >= 0:  # CPU: SIGXCPU at the limit, SIGKILL a second later if the program ignores it
            resource.setrlimit(what, (value, value + (1 if what == resource.RLIMIT_CPU else 0)))
    applied.append("rlimits")
    if not LINUX:
        return
    check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    landlock([p for p, _ in CFG["ro"]] + (["/proc"] if "fresh-proc" in applied else []))
    seccomp()


def run_confined(root, got):
    """Process D: confine itself, then run program.py; its exit status tells the supervisor how it ended."""
    try:
        confine(root, got)
    except Exception as e:
        report = {"error": f"sandbox setup failed: {e}", "applied": applied}
        os.write(CFG["report_fd"], (json.dumps(report) + "\n").encode())
        os._exit(1)
    os.write(CFG["report_fd"], (json.dumps({"applied": applied}) + "\n").encode())
    os.close(CFG["report_fd"])
    import types
    main = types.ModuleType("__main__")
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv = ["program.py"]
    sys.dont_write_bytecode = True
    code = 1
    try:
        with open("program.py", encoding="utf-8") as f:
            source = f.read()
        exec(compile(source, "program.py", "exec"), main.__dict__)
        code = FINISHED
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
        if code == FINISHED:
            code = 1  # only the bootstrap says "finished"
    except BaseException as e:
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    sys.exit(code)


FINISHED = CFG["finished"]
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, -1)


def supervise():
    try:
        got, root = enter_namespaces()
        c = os.fork()
    except Exception as e:
        os.write(CFG["status_fd"], (json.dumps({"error": f"sandbox setup failed: {e}"}) + "\n").encode())
        os._exit(1)
    if c:
        os.close(CFG["status_fd"])
        os.close(CFG["report_fd"])
        os.waitpid(c, 0)
        os._exit(0)
    # C, the supervisor; PID 1 when a PID namespace was granted
    if LINUX:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
        libc.prctl(4, 0, 0, 0, 0)  # not dumpable: the program may not read our memory
    os.umask(0o022)
    report = {}
    try:
        if "mount" in got:
            build_root(got)
        d = os.fork()
    except Exception as e:
        report["error"] = f"sandbox setup failed: {e}"
        os.write(CFG["status_fd"], (json.dumps(report) + "\n").encode())
        os._exit(1)
    if d == 0:
        run_confined(root, got)
    os.close(CFG["report_fd"])
    while True:  # as init, reap everything; the program's own end is the verdict
        pid, status, usage = os.wait4(-1, 0)
        if pid == d:
            break
    report.update(exit=os.waitstatus_to_exitcode(status), cpu=usage.ru_utime + usage.ru_stime)
    os.write(CFG["status_fd"], (json.dumps(report) + "\n").encode())
    os._exit(0)


supervise()
'''


@dataclass
class Outcome:
    """status: passed, failed (non-zero exit, e.g. an assertion), timeout (wall clock or CPU
    limit), crashed (killed by a signal), or error (could not start). `confinement` lists the
    mechanisms the sandbox applied to this program (see `sandbox_capabilities`)."""
    status: str
    returncode: int | None
    seconds: float
    output: str
    confinement: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


def _readonly_paths() -> list[tuple[str, str]]:
    """(path as the program sees it, real path on the host) of what the interpreter needs."""
    paths = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/etc/ld.so.cache", "/etc/ld.so.conf",
             "/etc/ld.so.conf.d", "/etc/localtime"]
    exe = os.path.realpath(sys.executable)
    for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
              os.path.dirname(os.path.dirname(exe))):
        p = os.path.abspath(p)
        if p != "/" and p not in paths:
            paths.append(p)
    return [(p, os.path.realpath(p)) for p in paths]


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    try:
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            chunks.append(b)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    return b"".join(chunks)


def run_program(source: str, timeout: float = 10.0, memory_mb: int = 1024, cpu_seconds: int | None = None,
                file_size_mb: int = 16, output_chars: int = 2000, *, drop_root_first: bool = False) -> Outcome:
    """Run `source` as a Python program in the sandbox and report how it ended.

    drop_root_first: when called as root, give up root before building the sandbox, as an
    ordinary user would run it (the sandbox then relies on user namespaces)."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    cpu = int(cpu_seconds if cpu_seconds is not None else math.ceil(timeout) + 1)
    base = tempfile.mkdtemp(prefix="telechat-sandbox-")
    work = os.path.join(base, "work")
    start = time.monotonic()
    fds = []
    try:
        os.chmod(base, 0o711)  # the sandbox uid must reach work/ when there is no private file tree
        os.mkdir(work)
        os.mkdir(os.path.join(base, "root"))
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        if drop_root_first and os.geteuid() == 0:
            for p in (base, work, os.path.join(base, "root"), os.path.join(work, "program.py")):
                os.chown(p, SANDBOX_UID, SANDBOX_UID)
        status_r, status_w = os.pipe()
        report_r, report_w = os.pipe()
        fds = [status_r, status_w, report_r, report_w]
        cfg = {"status_fd": status_w, "report_fd": report_w, "work": work, "work_real": os.path.realpath(work),
               "root": os.path.join(base, "root"), "ro": _readonly_paths(),
               "devices": ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"],
               "mem": memory_mb * 2**20 if memory_mb else -1, "cpu": cpu, "fsize": file_size_mb * 2**20,
               "work_mb": max(64, 4 * file_size_mb), "uid": SANDBOX_UID, "finished": FINISHED,
               "drop_root_first": drop_root_first}
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "no_proxy": "*"}
        out_path = os.path.join(base, "output.txt")
        with open(out_path, "wb") as out:
            try:
                proc = subprocess.Popen([sys.executable, "-I", "-c", _BOOT, json.dumps(cfg)], cwd=work, env=env,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True, pass_fds=(status_w, report_w))
            except OSError as e:
                return Outcome("error", None, 0.0, f"could not start the sandbox: {e}")
            finally:
                os.close(status_w)
                os.close(report_w)
                fds = [status_r, report_r]
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the sandbox's whole process group, the program included
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        seconds = time.monotonic() - start
        fds = []
        report_text, status_text = _read_all(report_r), _read_all(status_r)
        with open(out_path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4 * output_chars))
            text = f.read().decode("utf-8", "replace")[-output_chars:]
        return _verdict(status_text, report_text, timed_out, cpu, seconds, text)
    finally:
        for fd in fds:
            os.close(fd)
        _remove(base)


def _verdict(status_text: bytes, report_text: bytes, timed_out: bool, cpu: int, seconds: float,
             text: str) -> Outcome:
    try:  # what the program's process reported before it ran any program code
        report = json.loads(report_text.decode().splitlines()[0])
    except (ValueError, IndexError):
        report = {}
    applied = report.get("applied", [])
    if "error" in report:
        return Outcome("error", None, seconds, text + "\n[" + report["error"] + "]", applied)
    try:
        status = json.loads(status_text.decode().splitlines()[0])
    except (ValueError, IndexError):
        status = None
    if timed_out:
        return Outcome("timeout", None, seconds, text, applied)
    if status is None:
        return Outcome("error", None, seconds, text + "\n[the sandbox ended without a verdict]", applied)
    if "error" in status:
        return Outcome("error", None, seconds, text + "\n[" + status["error"] + "]", applied)
    rc = status["exit"]
    if rc == -signal.SIGXCPU or (rc == -signal.SIGKILL and status.get("cpu", 0) >= cpu - 0.05):
        return Outcome("timeout", rc, seconds, text + "\n[CPU time limit]", applied)
    if rc == FINISHED:
        return Outcome("passed", 0, seconds, text, applied)
    if rc == 0:
        return Outcome("failed", 0, seconds, text + "\n[exited before the end of the program]", applied)
    if rc < 0:
        return Outcome("crashed", rc, seconds, text + f"\n[killed by signal {-rc}]", applied)
    return Outcome("failed", rc, seconds, text, applied)


def _remove(base: str) -> None:
    # The program may have left directories without write or search permission.
    for top, dirs, _ in os.walk(base):
        for d in dirs:
            path = os.path.join(top, d)
            if not os.path.islink(path):  # never change what a link made by the program points to
                try:
                    os.chmod(path, 0o700)
                except OSError:
                    pass
    shutil.rmtree(base, ignore_errors=True)


def sandbox_capabilities() -> list[str]:
    """The confinement mechanisms this machine grants the sandbox (names as in Outcome.confinement)."""
    return list(_probe())


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[str, ...]:
    return tuple(run_program("pass", timeout=30).confinement)


def run_programs(sources: list[str], workers: int = 2, progress=None, **limits) -> list[Outcome]:
    """`run_program` over many programs, `workers` at a time, results in order."""
    def one(src):
        r = run_program(src, **limits)
        if progress is not None:
            progress(1)
        return r

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, sources))


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program that passes iff the completed function passes the problem's `check`."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"
