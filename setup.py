"""Everything is in pyproject.toml; this only ships `telechat-lm-eval.pth`, which lets a bare
`lm_eval --model telechat` find our model. A `.pth` has to sit at the root of site-packages, which
pyproject cannot express; it is added to both the regular and the editable wheel."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path("src", "telechat-lm-eval.pth")


class BuildPy(build_py):
    def run(self):
        super().run()
        self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH.name)]


class _WithPth:
    """Wraps setuptools' editable strategy (how it maps the sources) to add our `.pth` to the wheel."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH.name, PTH.read_bytes())

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)


class EditableWheel(editable_wheel):
    def _select_strategy(self, *args, **kwargs):  # setuptools >= 64
        return _WithPth(super()._select_strategy(*args, **kwargs))


setup(cmdclass={"build_py": BuildPy, "editable_wheel": EditableWheel})
