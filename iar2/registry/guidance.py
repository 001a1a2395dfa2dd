"""Guidance ids: the name of one sampling setup, as it appears in sample paths (ar/<run>/e<epoch>/<guidance>).

    static-2.25            static CFG at scale 2.25
    prog-1.75-3.0          progressive CFG from 1.75 to 3.0 (Eq. 17)
    pag-1.4-3.15           progressive attention-guided CFG (Eq. 18)
    pag-1.4-3.15-reject    ... followed by classifier reject sampling
    grid-pag-1.35-3.0      ... sampled as the class grids of Figures 9-11

`GuidanceId.parse` is the only reader of this syntax and `str()` the only writer; the Snakemake wildcard of
the sample rules is `PATTERN`. A new mode is one entry of MODES (and its schedule in iar2/ar/pag_cfg.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from iar2.config import ConfigError

# id word -> (GuidanceConfig.mode, how many scales the id carries: one static scale, or a start and an end)
MODES: dict[str, tuple[str, int]] = {"static": ("static", 1), "prog": ("progressive", 2), "pag": ("pag", 2)}
GRID, REJECT = "grid-", "-reject"
# The id without anchors: the wildcard constraint of `guidance` in the rules (workflow/rules/common.smk).
PATTERN = f"({GRID})?({'|'.join(MODES)})-[0-9.]+(-[0-9.]+)?({REJECT})?"
_RE = re.compile(rf"^(?P<grid>{GRID})?(?P<mode>{'|'.join(MODES)})-(?P<nums>[0-9.-]+?)(?P<reject>{REJECT})?$")
_FORMS = ", ".join(f"{m}-<scale>" if n == 1 else f"{m}-<start>-<end>" for m, (_, n) in MODES.items())


@dataclass(frozen=True)
class GuidanceId:
    mode: str  # a key of MODES
    scales: tuple[float, ...]  # (scale,) for static, (start, end) otherwise
    reject: bool = False
    grid: bool = False

    @classmethod
    def parse(cls, text: str | GuidanceId) -> GuidanceId:
        """The id `text` names; ConfigError naming the allowed forms when it is none."""
        if isinstance(text, GuidanceId):
            return text
        m = _RE.match(str(text))
        if not m:
            raise ConfigError(f"guidance: {text!r} is not a guidance id; allowed forms: {_FORMS} "
                              f"(+ {REJECT}), {GRID}<any of those>")
        mode, n = m["mode"], MODES[m["mode"]][1]
        parts = m["nums"].split("-")
        if len(parts) != n:
            form = f"{mode}-<scale>" if n == 1 else f"{mode}-<start>-<end>"
            raise ConfigError(f"guidance: {text!r}: {mode} takes {'one scale' if n == 1 else 'a start and an end'} "
                              f"({form})")
        try:
            scales = tuple(float(p) for p in parts)
        except ValueError:
            raise ConfigError(f"guidance: {text!r}: {m['nums']!r} are not numbers") from None
        gid = cls(mode, scales, bool(m["reject"]), bool(m["grid"]))
        # One spelling per setup: "static-2" and "static-2.0" would be two sample sets of one config.
        if str(gid) != text:
            raise ConfigError(f"guidance: {text!r}: write it as {str(gid)!r}")
        return gid

    def __str__(self) -> str:
        nums = "-".join(repr(float(s)) for s in self.scales)
        return f"{GRID if self.grid else ''}{self.mode}-{nums}{REJECT if self.reject else ''}"

    def config(self) -> dict:
        """The `sampling.guidance` section (iar2.ar.pag_cfg.GuidanceConfig) this id stands for."""
        mode = MODES[self.mode][0]
        if len(self.scales) == 1:
            return {"mode": mode, "scale": self.scales[0]}
        return {"mode": mode, "semantic": list(self.scales), "detail": list(self.scales)}
