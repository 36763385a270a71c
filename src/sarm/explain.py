"""Read a SARM reward feature by feature: attributions, feature statistics, contexts, logit lens, cards.

* Attribution: r = sum_i w_i z_i, so each active latent i contributes w_i z_i; `explain` lists them,
  largest positive and negative first, and the rows of `attribution_table` add up to the reward that
  `RewardModel.score_hidden` gives.
* Feature statistics (`feature_stats`), all from cached activations (no forward pass): firing rates on
  chosen vs rejected final tokens of an evaluation table, activation histograms, the top-activating
  sentence-final contexts of the SAE corpus (recovered by re-tokenising the sequence: a shard's `sent_seq`
  vectors follow `encode(...).sentence_ends`) and of the evaluation set's final tokens (the response end),
  and the tokens a decoder direction promotes through the model's final norm and unembedding (logit lens).
* `cards_html`: a static, self-contained HTML page of feature cards.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from sarm import activations, models
from sarm.errors import SarmError

if TYPE_CHECKING:
    from sarm.reward_model import RewardModel

log = logging.getLogger(__name__)

POSITIVE, NEGATIVE = "#1a9850", "#d73027"  # weight bars on the cards (the browser test looks for them)
CHOSEN, REJECTED = "#4575b4", "#f4a93b"  # firing-rate bars
CORPUS_COLOUR, EVAL_COLOUR = "#7b3294", "#878787"  # histograms


# --------------------------------------------------------------------------------------------------------
# Attribution
# --------------------------------------------------------------------------------------------------------


def check_features(indices, width: int, key: str = "feature") -> list[int]:
    """Feature indices as ints, each inside 0..width-1 (else a one-line SarmError naming `key`)."""
    out = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < width:
            raise SarmError(f"{key}: feature {index!r} is out of range (the model has {width} features: 0..{width - 1})")
        out.append(int(index))
    return out


def attribute(model: RewardModel, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features z [n, d], contributions w*z [n, d], rewards [n]) of standardised final-token states; the
    rewards are `model.score_hidden(hidden)` and each row of contributions sums to its reward."""
    features = model.features(hidden)
    return features, model.contributions(features), features @ model.weight


def explain(model: RewardModel, hidden: torch.Tensor, top: int = 10, labels: dict | None = None) -> list[dict]:
    """Per sequence: its reward and its largest positive and negative contributions (`top` of each, largest
    first), plus `rest`, the summed contribution of every other active feature, so that
    sum(positive) + sum(negative) + rest == reward."""
    features, contrib, rewards = attribute(model, hidden)
    out = []
    for z, c, r in zip(features, contrib, rewards):
        active = torch.nonzero(c).flatten()
        order = active[torch.argsort(c[active], descending=True)]
        pos = [i for i in order.tolist() if c[i] > 0][:top]
        neg = [i for i in reversed(order.tolist()) if c[i] < 0][:top]

        def rows(ids):
            return [
                {
                    "feature": i,
                    "activation": float(z[i]),
                    "weight": float(model.weight[i]),
                    "contribution": float(c[i]),
                    **({"label": labels.get(i)} if labels else {}),
                }
                for i in ids
            ]

        shown = set(pos) | set(neg)
        rest = float(sum(float(c[i]) for i in active.tolist() if i not in shown))
        out.append({"reward": float(r), "n_active": int(len(active)), "positive": rows(pos), "negative": rows(neg), "rest": rest})
    return out


def attribution_table(model: RewardModel, cache: activations.ActivationCache, pairs: pd.DataFrame) -> pd.DataFrame:
    """Every non-zero contribution of every cached sequence (long format): seq, id, side, subset, category,
    reward, rank (1 = largest |w_i z_i|), feature, activation, weight, contribution. Per seq the
    contributions sum to `reward`, which equals `score_cached`'s score."""
    cached_ids = cache.index.loc[cache.index["side"] == "chosen", "id"].tolist()
    if cached_ids != pairs["id"].tolist():
        raise SarmError(f"{cache.folder} was cached from other pairs than the table given; re-run its rule")
    features, contrib, rewards = attribute(model, cache.final())
    seq, feature = torch.nonzero(contrib, as_tuple=True)
    table = pd.DataFrame(
        {
            "seq": seq.numpy(),
            "feature": feature.numpy(),
            "activation": features[seq, feature].numpy(),
            "weight": model.weight[feature].numpy(),
            "contribution": contrib[seq, feature].numpy(),
        }
    )
    meta = cache.index[["seq", "id", "side"]].merge(pairs[["id", "subset", "category"]], on="id", how="left")
    meta = meta.assign(reward=rewards.numpy()[meta["seq"].to_numpy()])
    table = meta.merge(table, on="seq", how="left")  # a sequence with no active feature keeps one NaN row
    table["abs"] = table["contribution"].abs()
    table = table.sort_values(["seq", "abs"], ascending=[True, False], kind="stable").drop(columns="abs")
    table["rank"] = table.groupby("seq").cumcount() + 1
    cols = ["seq", "id", "side", "subset", "category", "reward", "rank", "feature", "activation", "weight", "contribution"]
    return table[cols].reset_index(drop=True)


def format_explanation(explanation: dict) -> str:
    """A plain-text table of one `explain` entry."""
    lines = [f"reward {explanation['reward']:+.6f} = sum of w_i*z_i over {explanation['n_active']} active features"]
    lines.append(f"{'':2}{'feature':>8} {'activation':>11} {'weight':>11} {'contribution':>13}  label")
    for sign, rows in (("+", explanation["positive"]), ("-", explanation["negative"])):
        for row in rows:
            lines.append(
                f"{sign:2}{row['feature']:>8} {row['activation']:>11.4f} {row['weight']:>+11.3e} "
                f"{row['contribution']:>+13.6f}  {row.get('label') or ''}".rstrip()
            )
    lines.append(f"{'':2}{'rest':>8} {'':>11} {'':>11} {explanation['rest']:>+13.6f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Feature statistics, contexts and the logit lens
# --------------------------------------------------------------------------------------------------------


def select_features(weight: torch.Tensor, fire_rate: torch.Tensor, n_weight: int, n_frequent: int, extra=()) -> list[dict]:
    """The features to card: the `n_weight` largest |w_i| (non-zero), then the `n_frequent` that fire most
    often (at least once), then `extra`; each once, with the reasons it was picked."""
    picked: dict[int, list[str]] = {}
    by_weight = torch.argsort(weight.abs(), descending=True, stable=True)[:n_weight]
    for i in by_weight.tolist():
        if weight[i] != 0:
            picked.setdefault(i, []).append("largest |weight|")
    for i in torch.argsort(fire_rate, descending=True, stable=True)[: n_frequent + len(picked)].tolist():
        if fire_rate[i] > 0 and sum("fires most" in r for r in picked.values()) < n_frequent:
            picked.setdefault(i, []).append("fires most")
    for i in check_features(extra, len(weight), "config key explain.features"):
        picked.setdefault(i, []).append("asked for")
    return [{"feature": i, "why": why} for i, why in picked.items()]


def _histogram(values: list[np.ndarray], bins: int = 30) -> dict:
    top = max([float(v.max()) for v in values if len(v)] + [1e-6])
    edges = np.linspace(0.0, top, bins + 1)
    return {"edges": edges.round(5).tolist(), "counts": [np.histogram(v, edges)[0].tolist() for v in values]}


def _clean(text: str) -> str:
    return text.replace("\r", "").replace("\n", " ⏎ ")


def corpus_contexts(cache: activations.ActivationCache, sae, feature_ids: list[int], n: int, batch_size: int = 4096):
    """Encode the cached sentence-final vectors (the SAE corpus) with `sae`; per feature, its top-`n`
    (activation, seq, sentence ordinal) and all its non-zero activations; plus the corpus size."""
    cols = torch.tensor(feature_ids, dtype=torch.long)
    values, seqs, ordinals = [], [], []
    for shard in cache.shards:
        tensors = cache.load_shard(shard)  # checked against its recorded sha256
        if "sent" not in tensors:
            continue
        sent_seq = tensors["sent_seq"].numpy()
        # vectors of one sequence are contiguous and in sentence order: the ordinal is the offset in its run
        starts = np.r_[0, np.flatnonzero(np.diff(sent_seq)) + 1]
        run = np.repeat(starts, np.diff(np.r_[starts, len(sent_seq)]))
        ordinals.append(np.arange(len(sent_seq)) - run)
        seqs.append(sent_seq)
        z = [sae.encode(chunk.to(sae.W_enc.dtype))[:, cols].float() for chunk in torch.split(tensors["sent"].float(), batch_size)]
        values.append(torch.cat(z))
    if not values:
        return {f: {"top": [], "values": np.zeros(0)} for f in feature_ids}, 0
    z, seqs, ordinals = torch.cat(values), np.concatenate(seqs), np.concatenate(ordinals)
    out = {}
    for j, f in enumerate(feature_ids):
        col = z[:, j]
        k = min(4 * n, int((col > 0).sum()))  # spare candidates: duplicated texts are dropped later
        top = torch.topk(col, k).indices.tolist() if k else []
        out[f] = {"top": [(float(col[i]), int(seqs[i]), int(ordinals[i])) for i in top], "values": col[col > 0].numpy()}
    return out, len(z)


def sentence_context(tokenizer, prompt, response: str, ordinal: int, max_length: int, before: int = 40, after: int = 6) -> dict:
    """The text around a sequence's `ordinal`-th sentence-final token: from the previous sentence end (at most
    `before` tokens back) to the token, then `after` tokens; recovered by re-tokenising, as cached."""
    enc = activations.encode(tokenizer, list(prompt), response, max_length)
    if ordinal >= len(enc.sentence_ends):
        raise SarmError(
            f"cached sentence {ordinal} does not exist in a re-tokenised sequence: the cache was made with another tokenizer or max_length; re-run its rule"
        )
    pos = int(enc.sentence_ends[ordinal])
    previous = int(enc.sentence_ends[ordinal - 1]) + 1 if ordinal > 0 else 0
    start = max(previous, pos - before)
    ids = enc.input_ids.tolist()
    return {
        "left": _clean(tokenizer.decode(ids[start:pos])),
        "token": _clean(tokenizer.decode(ids[pos : pos + 1])),
        "right": _clean(tokenizer.decode(ids[pos + 1 : pos + 1 + after])),
    }


@torch.no_grad()
def logit_lens(model_dir: str | Path, directions: torch.Tensor, n: int = 10, trust_remote_code: bool = False) -> list[dict]:
    """Per direction (rows of W_dec): the `n` tokens it promotes most and least through the base model's final
    norm and unembedding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    norm = next(
        (getattr(decoder, name) for name in models.FINAL_NORM_NAMES if isinstance(getattr(decoder, name, None), torch.nn.Module)),
        None,
    )
    if norm is None:
        raise SarmError(f"model at {model_dir}: no final norm found among {models.FINAL_NORM_NAMES} for the logit lens")
    logits = lm.get_output_embeddings()(norm(directions.float()))
    out = []
    for row in logits:
        up, down = torch.topk(row, n).indices.tolist(), torch.topk(-row, n).indices.tolist()
        out.append(
            {"promoted": [_clean(tokenizer.decode([i])) for i in up], "suppressed": [_clean(tokenizer.decode([i])) for i in down]}
        )
    return out


def feature_stats(
    model: RewardModel,
    eval_cache: activations.ActivationCache,
    eval_pairs: pd.DataFrame,
    corpus_cache: activations.ActivationCache | None,
    corpus_pairs: pd.DataFrame | None,
    model_dir: str | Path,
    n_weight: int = 8,
    n_frequent: int = 8,
    extra=(),
    n_contexts: int = 40,
    n_tokens: int = 10,
) -> dict:
    """Everything a feature card shows, for the selected features, as a JSON-ready dict."""
    from sarm.reward_model import remote_code  # sarm.reward_model imports this module's neighbours; import it late

    if model.config["features"] != "sae":
        raise SarmError("feature cards need a SARM reward model (features: sae), not the dense baseline")
    if eval_cache.index.loc[eval_cache.index["side"] == "chosen", "id"].tolist() != eval_pairs["id"].tolist():
        raise SarmError(f"{eval_cache.folder} was cached from other pairs than the table given; re-run its rule")
    features = model.features(eval_cache.final())
    fires = features > 0
    chosen_rate, rejected_rate = fires[0::2].float().mean(0), fires[1::2].float().mean(0)
    picked = select_features(model.weight, fires.float().mean(0), n_weight, n_frequent, extra)
    ids = [p["feature"] for p in picked]
    base = model.config["base_model"]
    trust = remote_code(base, model.trust_remote_code, getattr(model, "folder", "reward model"))  # the caller's decision
    tokenizer = models.load_tokenizer(model.backbone_path, base.get("chat_template"), trust)

    corpus, n_corpus = ({f: {"top": [], "values": np.zeros(0)} for f in ids}, 0)
    if corpus_cache is not None and ids:
        corpus, n_corpus = corpus_contexts(corpus_cache, model.sae, ids, n_contexts)
    corpus_seqs = activations.pair_sequences(corpus_pairs) if corpus_pairs is not None else None
    eval_seqs = activations.pair_sequences(eval_pairs)
    lens = logit_lens(model_dir, model.sae.W_dec[ids].detach().float(), n_tokens, trust) if ids else []

    cards = []
    for p, lens_row in zip(picked, lens):
        f = p["feature"]
        col = features[:, f]
        eval_top = torch.topk(col, min(4 * n_contexts, int((col > 0).sum()))).indices.tolist()
        contexts, seen = [], set()
        for value, seq, ordinal in corpus[f]["top"]:
            row = corpus_seqs.iloc[seq]
            ctx = sentence_context(tokenizer, row.prompt, row.response, ordinal, base["max_length"])
            text = (ctx["left"], ctx["token"], ctx["right"])  # a prompt's sentences recur in both sides of a pair
            if text not in seen and len(contexts) < n_contexts:
                seen.add(text)
                contexts.append({"activation": round(value, 4), "id": row.id, "side": row.side, **ctx})
        eval_contexts, seen = [], set()
        for seq in eval_top:
            row = eval_seqs.iloc[seq]
            pair = eval_pairs.iloc[row.pair]
            if row.response[-240:] in seen or len(eval_contexts) >= n_contexts:
                continue
            seen.add(row.response[-240:])
            eval_contexts.append(
                {
                    "activation": round(float(col[seq]), 4),
                    "contribution": float(col[seq] * model.weight[f]),
                    "id": row.id,
                    "side": row.side,
                    "subset": pair.subset,
                    "prompt": _clean(str(row.prompt[-1]["content"]))[-200:],
                    "response_end": _clean(row.response)[-240:],
                }
            )
        cards.append(
            {
                **p,
                "weight": float(model.weight[f]),
                "weight_rank": int((model.weight.abs() > abs(model.weight[f])).sum()) + 1,
                "fire_chosen": float(chosen_rate[f]),
                "fire_rejected": float(rejected_rate[f]),
                "fire_corpus": float(len(corpus[f]["values"]) / n_corpus) if n_corpus else None,
                "histogram": _histogram([corpus[f]["values"], col[col > 0].numpy()]),
                "corpus_contexts": contexts,
                "eval_contexts": eval_contexts,
                "logit_lens": lens_row,
            }
        )
    return {
        "width": len(model.weight),
        "max_abs_weight": float(model.weight.abs().max()),
        "n_nonzero_weights": int((model.weight != 0).sum()),
        "n_eval_sequences": len(features),
        "n_corpus_vectors": n_corpus,
        "features": cards,
    }


# --------------------------------------------------------------------------------------------------------
# The HTML page
# --------------------------------------------------------------------------------------------------------

CSS = f"""
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; background: #fff; }}
h1 {{ font-size: 22px; margin: 0 0 6px; }}
.intro {{ max-width: 1100px; font-size: 13px; color: #444; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 16px; margin-top: 16px; }}
.card {{ border: 1px solid #ccc; border-radius: 6px; padding: 12px 14px; background: #fafafa; font-size: 12.5px; overflow: hidden; }}
.card h2 {{ font-size: 16px; margin: 0 0 8px; }}
.label {{ font-weight: normal; color: #333; }}
.unlabelled {{ font-weight: normal; color: #999; font-style: italic; }}
.row {{ display: flex; align-items: center; gap: 8px; margin: 3px 0; }}
.key {{ width: 128px; color: #555; }}
.track {{ width: 220px; height: 14px; background: #e8e8e8; border-radius: 2px; }}
.bar {{ height: 14px; border-radius: 2px; }}
.pos {{ background: {POSITIVE}; }} .neg {{ background: {NEGATIVE}; }}
.chosen {{ background: {CHOSEN}; }} .rejected {{ background: {REJECTED}; }}
.num {{ font-family: monospace; }}
.why {{ color: #777; font-size: 11.5px; }}
h3 {{ font-size: 13px; margin: 10px 0 4px; }}
ol {{ margin: 0; padding-left: 22px; }} li {{ margin: 2px 0; }}
mark {{ background: #ffe08a; padding: 0 1px; }}
.act {{ color: #777; font-family: monospace; font-size: 11px; }}
.tok {{ display: inline-block; font-family: monospace; background: #eef; border-radius: 3px; padding: 0 4px; margin: 1px; white-space: pre; }}
.tok.down {{ background: #fee; }}
img {{ max-width: 100%; }}
"""


def histogram_png(hist: dict, weight: float) -> str:
    """The activation histogram (corpus and evaluation set) as a base64 PNG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.asarray(hist["edges"])
    fig, ax = plt.subplots(figsize=(4.8, 1.6), dpi=90)
    for counts, colour, name in zip(
        hist["counts"], (CORPUS_COLOUR, EVAL_COLOUR), ("SAE corpus (sentence ends)", "eval set (final token)")
    ):
        counts = np.asarray(counts, dtype=float)
        if counts.sum():
            ax.stairs(counts / counts.sum(), edges, fill=True, alpha=0.55, color=colour, label=f"{name}, n={int(counts.sum())}")
    ax.set_xlabel("activation z (non-zero)", fontsize=8)
    ax.set_ylabel("share", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _bar(fraction: float, cls: str) -> str:
    width = 0.0 if fraction <= 0 else max(2.0, min(100.0, 100 * fraction))
    return f'<div class="track"><div class="bar {cls}" style="width:{width:.1f}%"></div></div>'


def _card(card: dict, max_abs_weight: float, label: dict | None, n_show: int) -> str:
    e = html.escape
    f, w = card["feature"], card["weight"]
    if label and label.get("label"):
        score = f" · monosemanticity {label['score']}/5" if label.get("score") else ""
        title = f'<span class="label">{e(label["label"])}</span><span class="why">{e(score)}</span>'
    else:
        title = '<span class="unlabelled">unlabelled</span>'
    parts = [
        f'<section class="card" id="feature-{f}">',
        f"<h2>#{f} · {title}</h2>",
        f'<div class="why">picked for: {e(", ".join(card["why"]))}; weight rank {card["weight_rank"]}</div>',
        f'<div class="row"><span class="key">weight w</span>{_bar(abs(w) / max_abs_weight if max_abs_weight else 0, "pos" if w > 0 else "neg")}'
        f'<span class="num">{w:+.3e}</span></div>',
        f'<div class="row"><span class="key">fires on chosen</span>{_bar(card["fire_chosen"], "chosen")}<span class="num">{100 * card["fire_chosen"]:.1f}%</span></div>',
        f'<div class="row"><span class="key">fires on rejected</span>{_bar(card["fire_rejected"], "rejected")}<span class="num">{100 * card["fire_rejected"]:.1f}%</span></div>',
    ]
    if card.get("fire_corpus") is not None:
        parts.append(
            f'<div class="row"><span class="key">fires in corpus</span><span class="num">{100 * card["fire_corpus"]:.2f}% of sentence ends</span></div>'
        )
    parts.append(f'<img alt="activation histogram of feature {f}" src="{histogram_png(card["histogram"], w)}">')
    lens = card["logit_lens"]
    parts.append("<h3>Logit lens: tokens the decoder direction promotes / suppresses</h3><div>")
    parts += [f'<span class="tok">{e(t)}</span>' for t in lens["promoted"]]
    parts.append("</div><div>")
    parts += [f'<span class="tok down">{e(t)}</span>' for t in lens["suppressed"]]
    parts.append("</div>")
    parts.append("<h3>Top contexts: SAE corpus (sentence-final token marked)</h3><ol>")
    for c in card["corpus_contexts"][:n_show]:
        parts.append(
            f'<li>{e(c["left"])}<mark>{e(c["token"])}</mark>{e(c["right"])} <span class="act">z={c["activation"]:.2f} · {e(c["side"])}</span></li>'
        )
    if not card["corpus_contexts"]:
        parts.append('<li class="why">no sentence-final vector of the corpus fires it</li>')
    parts.append("</ol><h3>Top contexts: evaluation set (the response end, where the reward is read)</h3><ol>")
    for c in card["eval_contexts"][:n_show]:
        parts.append(
            f'<li>…{e(c["response_end"])}<mark>⟨end⟩</mark> <span class="act">z={c["activation"]:.2f} · w·z={c["contribution"]:+.2e} · '
            f"{e(c['side'])} · {e(c['subset'])}</span></li>"
        )
    if not card["eval_contexts"]:
        parts.append('<li class="why">no final token of the evaluation set fires it</li>')
    parts.append("</ol></section>")
    return "\n".join(parts)


def cards_html(stats: dict, labels: dict | None = None, title: str = "SARM feature cards", n_show: int = 8) -> str:
    """A static, self-contained page (inline CSS, inline PNG histograms) with one card per feature."""
    labels = labels or {}
    n_labelled = sum(1 for c in stats["features"] if (labels.get(str(c["feature"])) or {}).get("label"))
    intro = (
        f"{len(stats['features'])} features of {stats['width']} ({stats['n_nonzero_weights']} with a non-zero head weight). "
        f"The reward is r = Σ w<sub>i</sub> z<sub>i</sub>: a green weight bar raises the reward when the feature fires, a red one lowers it "
        f"(bar length: |w| relative to the largest, {stats['max_abs_weight']:.3e}). Firing rates: share of the {stats['n_eval_sequences'] // 2} "
        f"chosen and rejected final tokens of the evaluation table where z &gt; 0. Contexts: {stats['n_corpus_vectors']} sentence-final vectors "
        f"of the SAE corpus and the evaluation set's final tokens. Labels: {n_labelled} of {len(stats['features'])} features."
    )
    cards = [_card(c, stats["max_abs_weight"], labels.get(str(c["feature"])), n_show) for c in stats["features"]]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<style>{CSS}</style></head><body>\n<h1>{html.escape(title)}</h1><p class="intro">{intro}</p>\n'
        f'<div class="grid">\n' + "\n".join(cards) + "\n</div></body></html>\n"
    )


# --------------------------------------------------------------------------------------------------------
# `sarm explain`
# --------------------------------------------------------------------------------------------------------


def _command(args) -> None:
    import json

    from sarm.reward_model import load_feature_head  # sarm.reward_model imports this module's neighbours; import it late

    model = load_feature_head(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    feature = check_features([args.feature], len(model.weight), "--feature")[0] if args.feature is not None else None
    labels = None
    if args.labels:
        try:
            raw = json.loads(Path(args.labels).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SarmError(f"--labels {args.labels}: cannot read it ({type(err).__name__})") from None
        labels = {int(k): v.get("label") for k, v in raw.items() if v.get("label")}
    hidden = model.hidden([args.prompt], [args.response])
    explanation = explain(model, hidden, args.top, labels)[0]
    if feature is not None:
        z = model.features(hidden)[0, feature]
        explanation["feature"] = {
            "feature": feature,
            "activation": float(z),
            "weight": float(model.weight[feature]),
            "contribution": float(z * model.weight[feature]),
        }
    print(json.dumps(explanation, indent=1) if args.json else format_explanation(explanation))


def register(subparsers) -> None:
    from sarm.cli import add_trust_remote_code

    cmd = subparsers.add_parser("explain", help="a reward as its features' contributions w_i*z_i, largest first")
    cmd.add_argument("--model", required=True, help="a reward model folder, e.g. results/reward/sarm")
    cmd.add_argument("--prompt", required=True)
    cmd.add_argument("--response", required=True)
    cmd.add_argument("--top", type=int, default=10, help="positive and negative contributions listed (the rest is summed)")
    cmd.add_argument("--feature", type=int, default=None, help="also report this feature's activation and contribution")
    cmd.add_argument("--labels", default=None, help="a labels.json of the workflow (results/explain/sarm/labels.json)")
    cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cmd.add_argument("--device", default="cpu")
    add_trust_remote_code(cmd)
    cmd.set_defaults(func=_command)
