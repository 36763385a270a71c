"""What an SAE reads: the hidden state its hook names and the normalisation it expects, checked against the config.

This project's SAEs read `hidden_states[L]` (the residual stream after decoder layer L = config key model.layer)
standardised per token; their cfg records the hook `hidden_states.{L}.standardized`. A public SAE reads its own
hook point, raw, and normalises it itself as its config says. TransformerLens names map onto Hugging Face's
`hidden_states` (index 0 = the embeddings): `blocks.{n}.hook_resid_pre` = hidden_states[n],
`blocks.{n}.hook_resid_post` = hidden_states[n + 1] (before the final norm, as the truncated model caches it).
Other hooks (attention or MLP outputs, hook_z, ...) are not residual-stream states and are refused.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from sarm.errors import SarmError

log = logging.getLogger(__name__)

KEY = "config key sae.pretrained"
# hook name -> (hidden_states index from the number in it, standardised per token)
HOOKS = (
    (re.compile(r"hidden_states\.(\d+)\.standardized"), 0, True),  # this project's SAEs
    (re.compile(r"hidden_states\.(\d+)"), 0, False),
    (re.compile(r"blocks\.(\d+)\.hook_resid_pre"), 0, False),
    (re.compile(r"blocks\.(\d+)\.hook_resid_post"), 1, False),
    (re.compile(r"(?:model\.)?layers\.(\d+)"), 1, False),  # a decoder layer's output (sparsify's hookpoints)
)
# sae-lens applies these inside SAE.encode; `expected_average_only_in` needs a dataset-wide scale that only the
# registry records (SAE.from_pretrained folds it in), `covariance_whitening` needs statistics folded in first.
SELF_APPLIED = ("none", "constant_norm_rescale", "layer_norm")


def read_config(spec: dict) -> tuple[dict, bool]:
    """The pretrained SAE's sae-lens config as a dict, and whether sae-lens folds its norm scaling factor in when
    it loads it (a registry SAE whose release records one). `{path}`: the folder's cfg.json; `{release, sae_id}`:
    the config alone, through sae-lens' registry (a few kB from the hub, cached by huggingface_hub)."""
    if spec.get("path"):
        path = Path(spec["path"]) / "cfg.json"
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise SarmError(f"{KEY}: {spec['path']} is not an sae-lens folder (no cfg.json)") from None
        except (OSError, ValueError) as err:
            raise SarmError(f"{KEY}: {path} is unreadable ({type(err).__name__})") from None
        from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

        return handle_config_defaulting(cfg), False
    try:
        from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface
        from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor

        cfg = load_sae_config_from_huggingface(spec["release"], spec["sae_id"])
        return cfg, get_norm_scaling_factor(spec["release"], spec["sae_id"]) is not None
    except Exception as err:  # unknown release, no hub: one line, with the way out
        raise SarmError(
            f"{KEY}: the config of SAE {spec['release']}/{spec['sae_id']} could not be read ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160] if str(err) else ''}); without the hub, save it as a folder and give {{path: ...}}"
        ) from None


def hook_name(cfg: dict) -> str | None:
    return (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")


def _the_sae(hook: str | None) -> str:
    return f"the SAE (hook {hook})" if hook else "the SAE (no hook name)"


def sae_input(cfg: dict, layer: int, folded: bool = False) -> dict:
    """What the SAE of config `cfg` (a cfg.json dict) reads, checked against config key model.layer = `layer`:
    {hook_name, hidden_states (the index), standardize (per token, this project's own SAEs), normalize_activations
    (what sae-lens applies inside encode), d_in}. `folded`: sae-lens folds the registry's norm scaling factor in
    at load time. A hook that is not a residual-stream state, another layer, or a normalisation sae-lens does not
    apply itself is refused with one line naming the hook and the config keys. An SAE without a hook name is taken
    to be one of this project's (standardised states of model.layer)."""
    hook = hook_name(cfg)
    here = f"config key model.layer = {layer} caches hidden_states[{layer}]"
    norm = cfg.get("normalize_activations") or "none"
    if hook is None:
        log.warning("%s: the SAE records no hook name; taken to read this project's standardised hidden_states[%d]", KEY, layer)
        index, standardize = layer, True
    else:
        for pattern, offset, standardize in HOOKS:
            found = pattern.fullmatch(hook)
            if found:
                index = int(found.group(1)) + offset
                break
        else:
            raise SarmError(
                f"{KEY}: the SAE's hook {hook} is not a residual-stream state this pipeline caches ({here}); "
                "use an SAE on blocks.{n}.hook_resid_post (hidden_states[n+1]) or blocks.{n}.hook_resid_pre"
            )
        if (cfg.get("metadata") or {}).get("hook_head_index") is not None or cfg.get("hook_head_index") is not None:
            raise SarmError(f"{KEY}: the SAE's hook {hook} reads one attention head; {here}, the whole residual stream")
    if index != layer:
        raise SarmError(
            f"{KEY}: the SAE's hook {hook} reads hidden_states[{index}], but {here}; "
            f"set model.layer: {index} or use an SAE of that layer"
        )
    if norm == "expected_average_only_in" and folded:
        norm = "none"  # SAE.from_pretrained folds the registry's scaling factor into the weights
    if norm not in SELF_APPLIED:
        how = (
            "a dataset-wide scale sae-lens applies only when its registry records it: fold it in first "
            "(sae.fold_activation_norm_scaling_factor) and save the SAE"
            if norm == "expected_average_only_in"
            else "which sae-lens does not apply inside encode"
        )
        raise SarmError(f"{KEY}: {_the_sae(hook)} expects normalize_activations = {norm!r}, {how} ({here})")
    return {
        "hook_name": hook,
        "hidden_states": index,
        "standardize": standardize,
        "normalize_activations": norm,
        "d_in": cfg.get("d_in"),
    }


def pretrained_input(spec: dict, layer: int) -> dict:
    """sae_input of the SAE named by config key sae.pretrained (read at workflow start, before any job runs)."""
    cfg, folded = read_config(spec)
    return sae_input(cfg, layer, folded)


def check_width(states: dict, hidden_size: int, layer: int | None) -> None:
    if states.get("d_in") is not None and states["d_in"] != hidden_size:
        where = f"hidden_states[{layer}] (config key model.layer = {layer})" if layer is not None else "cached states"
        raise SarmError(
            f"{KEY}: {_the_sae(states['hook_name'])} reads {states['d_in']}-dim inputs, but the model's "
            f"{where} are {hidden_size}-dim"
        )


def check_cache(sae, cache) -> dict:
    """The loaded SAE reads what the activation cache (an ActivationCache) holds: the same layer, width and
    normalisation. The SAE stage's last check, in case the cache was written for another SAE (a registry SAE's
    config is read again as it loads). Returns the SAE's input, as the SAE's metrics record it."""
    meta = getattr(cache, "meta", {})
    layer, cfg = meta.get("layer"), sae.cfg.to_dict()
    if layer is None:  # a cache written outside the workflow: only the width can be checked
        states = {"hook_name": hook_name(cfg), "d_in": sae.cfg.d_in, "standardize": True}
    else:
        states = sae_input(cfg, layer)
    check_width(states, cache.hidden_size, layer)
    held = (meta.get("sae_input") or {"standardize": True})["standardize"]
    if held != states["standardize"]:
        kinds = {True: "standardised", False: "raw"}
        raise SarmError(
            f"{KEY}: {_the_sae(states['hook_name'])} reads {kinds[states['standardize']]} hidden states, but the "
            f"activation cache holds {kinds[held]} ones (config key model.layer = {layer}); delete the "
            "activation caches and run again"
        )
    return states
