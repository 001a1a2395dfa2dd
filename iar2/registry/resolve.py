"""The config each job runs with at one scale: the scale's base sections (params/<scale>.yaml) merged with what
the registry says of the tokenizer, run or guidance, and validated by the job's own config dataclass."""
from __future__ import annotations

import copy

from iar2 import layout
from iar2.config import ConfigError, deep_merge, from_dict, to_dict
from iar2.registry.guidance import GuidanceId
from iar2.scale import Scale
from iar2.tokenizer.config import TokenizerRunConfig

class Configs:
    """Resolved configs of one scale. `tokenizers` are the registry's tokenizer specs, `families` its model
    families; runs come in as iar2.registry.plan.Run."""

    def __init__(self, scale: Scale, tokenizers: dict[str, dict], families: dict[str, dict]):
        self.s = scale
        self.results = scale.results
        self.tokenizers = tokenizers
        self.families = families

    # -- the paper's sizes at this scale
    def codebook(self, n: int) -> int:
        cb = self.s.codebooks
        if n not in cb:
            raise ConfigError(f"codebooks: no entry for the paper's size {n}; add `{n}: <size at this scale>`")
        return int(cb[n])

    def image_size(self, grid: int) -> int:
        g = self.s.grids
        if grid not in g:
            raise ConfigError(f"grids: no image size for the paper's {grid}x{grid} grid; allowed values: "
                              + ", ".join(map(str, g)))
        return int(g[grid])

    # -- tokenizers
    def stages(self, tok: str) -> list[str]:
        return ["stage1", "stage2"] if self.tokenizers[tok]["model"]["quantizer"] == "semantic_detail" else ["single"]

    def base_tokenizer(self, tok: str) -> str:
        return tok[: -len(layout.REARRANGED)] if tok.endswith(layout.REARRANGED) else tok

    def tokenizer_config(self, tok: str, stage: str) -> dict:
        spec = self.tokenizers[tok]
        tb = self.s.tokenizer
        model = dict(spec["model"])
        for k in ("codebook_size", "semantic_size", "detail_size"):
            if k in model:
                model[k] = self.codebook(int(model[k]))
        raw = deep_merge(tb.base, {"model": model})
        raw = deep_merge(raw, {"name": f"{tok}-{stage}" if stage != "single" else tok,
                               "data": {"root": self.s.data.root,
                                        "check_report": f"{self.results}/{layout.data_check()}"},
                               "loss": {"domain_net": f"{self.results}/{layout.refnet()}"},
                               "train": {"stage": stage}})
        if stage == "stage1":
            raw = deep_merge(raw, tb.stage1)
        if stage == "stage2":
            raw = deep_merge(raw, {"train": {"init_from": f"{self.results}/{layout.stage1_vq(tok)}"}})
        if raw["loss"].get("perceptual") != "domain":
            raw["loss"].pop("domain_net")
        return to_dict(from_dict(TokenizerRunConfig, raw, "tokenizer"))  # errors: tokenizer.model: ...

    def final_model(self, tok: str) -> dict:
        """The model section of the tokenizer `tok` (a rearranged one: its base's) after its last stage."""
        base = self.base_tokenizer(tok)
        return self.tokenizer_config(base, self.stages(base)[-1])["model"]

    def token_grid(self, tok: str, grid: int) -> int:
        return self.image_size(grid) // 2 ** (len(self.final_model(tok)["ch_mult"]) - 1)

    # -- AR runs
    def ar_config(self, r, epoch_steps: float | None = None, identity: bool = False) -> dict:
        """The run `r`'s config; with `identity`, what makes two runs one: all but its name and how long it trains."""
        # its module imports torch (the model config): loaded only when a plan resolves its runs
        from iar2.ar.config import ARRunConfig

        m = self.final_model(r.tokenizer)
        vocab = ({"vocab_size": m["codebook_size"]} if m["quantizer"] == "single"
                 else {"semantic_size": m["semantic_size"], "detail_size": m["detail_size"]})
        ar = self.s.ar
        raw = deep_merge(ar.base, {"model": {"grid": self.token_grid(r.tokenizer, r.grid), **vocab}})
        raw = deep_merge(raw, {"model": self.families[r.family].get("model", {})})
        if r.tokenizer.endswith(layout.REARRANGED):
            raw = deep_merge(raw, {"model": {"cluster_size": m["codebook_size"] // self.s.rearrange.clusters}})
        sw = self.families[r.family].get("semantic_weight")
        if sw:
            raw = deep_merge(raw, {"model": {"semantic_weight": sw.get(f"{r.size}-{r.grid}", sw.get(r.size, 1.0))}})
        raw = deep_merge(raw, ar.sizes.get(r.size, {}))
        raw = deep_merge(raw, ar.sizes.get(f"{r.size}-{r.grid}", {}))
        raw = deep_merge(raw, {"model": r.model})
        train = {"tokens": f"{self.results}/{layout.tokens_dir(r.tokenizer, r.grid)}",
                 "epochs": float(max(r.epochs)) if r.epochs else float(raw.get("train", {}).get("epochs", 1)),
                 "ckpt_epochs": sorted(r.epochs)}
        es = epoch_steps if epoch_steps is not None else ar.epoch_steps
        if es is not None:
            train["epoch_steps"] = float(es)
        if r.seed_offset:  # a seeded copy (iar2/seeds.py): the same run under another training seed
            train["seed"] = int(raw.get("train", {}).get("seed", 0)) + r.seed_offset
        raw = deep_merge(raw, {"name": r.id, "train": train})
        cfg = to_dict(from_dict(ARRunConfig, raw, "ar"))
        if identity:
            cfg = copy.deepcopy(cfg)
            for k in ("epochs", "ckpt_epochs"):
                cfg["train"].pop(k)
            cfg.pop("name")
            cfg["identity"] = {"time_match": r.time_match, "paper_grid": r.grid}
        return cfg

    # -- sample sets
    def sample_config(self, gid: GuidanceId | str, tables=()) -> dict:
        """The sampling config of a set under guidance `gid` feeding `tables` (sampling.per_class_by_table)."""
        from iar2.sample_config import SampleRunConfig  # imports torch too

        g = GuidanceId.parse(gid)
        sb = self.s.sampling
        raw = deep_merge(sb.base, {"sampling": {"guidance": g.config()}})
        sized = [sb.per_class_by_table[t] for t in tables if t in sb.per_class_by_table]
        if sized:
            raw = deep_merge(raw, {"per_class": max(sized)})
        if g.reject:
            raw = deep_merge(raw, sb.reject)
            if raw.get("reject", {}).get("classifier", "domain") == "domain":
                raw = deep_merge(raw, {"reject": {"domain_net": f"{self.results}/{layout.refnet()}"}})
        if g.grid:
            raw = deep_merge(raw, sb.grid)
        return to_dict(from_dict(SampleRunConfig, raw, "sampling"))

    def samples_per_set(self) -> int:
        b = self.s.sampling.base
        return int(b.get("per_class", 50)) * int(b.get("num_classes") or self.s.ar.base["model"].get("num_classes", 1000))

    # -- SLURM
    def resources(self, rule: str, r=None) -> dict:
        """The scale's SLURM resources of one job (of the AR run `r` for ar_train)."""
        return self.s.resources.of(rule, r.size, r.grid) if r is not None else self.s.resources.of(rule)
