"""PII masking: e-mail addresses, phone numbers (Chinese mobile and landline, international,
North-American), Chinese resident ID numbers (only with a valid birth date and checksum) and IP
addresses. Candidates that fail validation (an ID with a wrong check digit, 999.1.1.1, "std::map")
are left as they are."""
from __future__ import annotations

import datetime
import ipaddress
import re

from .base import CleanStep

ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
ID_CHECK = "10X98765432"

EMAIL_RE = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![A-Za-z0-9-])")
ID_CARD_RE = re.compile(r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
                        r"\d{3}[0-9Xx](?![0-9A-Za-z])")
PHONE_RES = [
    # Chinese mobile: 1[3-9]x xxxx xxxx, optionally +86 / 0086, with optional separators
    re.compile(r"(?<![0-9+])(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?![0-9])"),
    # Chinese landline with area code (separator or parentheses required) and 400/800 hotlines
    re.compile(r"(?<![0-9])(?:\(0\d{2,3}\)[ -]?|0\d{2,3}-)\d{3,4}[ -]?\d{4}(?![0-9])"),
    re.compile(r"(?<![0-9])[48]00[ -]\d{3}[ -]\d{4}(?![0-9])"),
    # international: +CC then groups; checked to hold 8-15 digits
    re.compile(r"(?<![0-9A-Za-z+])\+[1-9]\d{0,2}[ -]?(?:\(\d{1,4}\)[ -]?)?\d{1,4}(?:[ -]?\d{2,4}){1,4}(?![0-9])"),
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567
    re.compile(r"(?<![0-9.-])(?:\(\d{3}\) ?|\d{3}[-.])\d{3}[-.]\d{4}(?![0-9]|[-.]\d)"),
]
IPV4_RE = re.compile(r"(?<![0-9.vV])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                     r"(?![0-9]|\.\d)")
IPV6_RE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")


def valid_id_card(s: str) -> bool:
    """18-character Chinese resident ID: a real birth date and the ISO 7064 MOD 11-2 check digit."""
    if len(s) != 18 or not s[:17].isdigit():
        return False
    try:
        born = datetime.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    if not datetime.date(1880, 1, 1) <= born <= datetime.date.today():
        return False
    total = sum(int(d) * w for d, w in zip(s[:17], ID_WEIGHTS))
    return ID_CHECK[total % 11] == s[17].upper()


def _valid_ipv6(s: str) -> bool:
    groups = [g for g in s.split(":") if g]
    if len(groups) < 2 or not any(c.isdigit() for c in s):
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


class PIIMasker:
    def __init__(self, email: bool = True, phone: bool = True, id_card: bool = True, ip: bool = True,
                 replacements: dict | None = None):
        self.on = {"email": email, "phone": phone, "id_card": id_card, "ip": ip}
        self.rep = {"email": "<EMAIL>", "phone": "<PHONE>", "id_card": "<ID_CARD>", "ip": "<IP>"}
        self.rep.update(replacements or {})

    def __call__(self, text: str, counts: dict | None = None) -> str:
        counts = counts if counts is not None else {}

        def sub(kind: str, regex: re.Pattern, text: str, check=None) -> str:
            n = 0

            def repl(m: re.Match) -> str:
                nonlocal n
                if check is not None and not check(m.group(0)):
                    return m.group(0)
                n += 1
                return self.rep[kind]

            out = regex.sub(repl, text)
            if n:
                counts[kind] = counts.get(kind, 0) + n
            return out

        # order: e-mails first (they contain digits), ID cards before phones (18 digits contain 11)
        if self.on["email"] and "@" in text:
            text = sub("email", EMAIL_RE, text)
        if self.on["id_card"]:
            text = sub("id_card", ID_CARD_RE, text, valid_id_card)
        if self.on["phone"]:
            for r in PHONE_RES:
                text = sub("phone", r, text, _phone_digits_ok)
        if self.on["ip"]:
            if "." in text:
                text = sub("ip", IPV4_RE, text)
            if "::" in text or text.count(":") >= 7:
                text = sub("ip", IPV6_RE, text, _valid_ipv6)
        return text


def _phone_digits_ok(s: str) -> bool:
    n = sum(c.isdigit() for c in s)
    return 7 <= n <= 15


class PIIStep(CleanStep):
    name = "🔒 PII"

    def __init__(self, key: str, pcfg: dict, **kw):
        super().__init__(key, **kw)
        self.masker = PIIMasker(pcfg["email"], pcfg["phone"], pcfg["id_card"], pcfg["ip"], pcfg["replacements"])

    def process(self, doc):
        counts: dict = {}
        doc.text = self.masker(doc.text, counts)
        for k, v in counts.items():
            self.account.count(f"masked_{k}", v)
        return None
