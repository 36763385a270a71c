"""Token-level rewards from a sequence-level reward model: its head applied at every position of the response.

A reward model reads its reward at the final token (the end-of-turn token) of the chat-templated prompt +
response. Applying the same head (same standardisation, same SAE and TopK, same left truncation) to the state at
each earlier position t of the response gives a reward curve r_t whose last value is the sequence reward: a
dense signal for credit assignment (`TokenRewards.dense`: r_t - r_{t-1}, potential-based shaping) and, drawn
token by token (`render_html`), a view of where in a response the reward rises and falls.

`RewardModel.token_rewards` / `token_rewards_batch` (and the full-depth classifier's) return `TokenRewards`;
`sarm serve` returns them on request (`"token_rewards": true`), `sarm score --token-rewards` prints them and
`--html` draws them; the explain stage writes pages for a few evaluation pairs (`write_pages`).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sarm import activations

DECODE_WINDOW = 4  # tokens decoded before the one being cut out (a tokenizer may drop a leading space at a start)


@dataclass(frozen=True)
class TokenRewards:
    """The reward at each token of one response, from its first token through the final (end-of-turn) token.

    `tokens`: each token's text as decoded (a character split over several tokens goes with the last of them;
    the others are ""), `offsets`: their (start, end) in `text` = "".join(tokens); `positions`: the tokens'
    positions in the (left-truncated) sequence; `rewards`: r_t, the last of which is the sequence reward;
    `top_features`: for a linear head, per token the k largest non-zero contributions w_i z_i (by magnitude) as
    {"feature", "contribution", "activation"}; None when not asked or not a linear head.
    """

    tokens: list[str]
    offsets: list[tuple[int, int]]
    positions: np.ndarray
    rewards: np.ndarray
    truncated: bool
    top_features: list[list[dict]] | None = None

    @property
    def reward(self) -> float:
        """The sequence reward: r at the final token."""
        return float(self.rewards[-1])

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def dense(self) -> np.ndarray:
        """Per-token rewards for RL credit assignment: r_t - r_{t-1} (0 at the first token). Potential-based
        shaping: they sum to the sequence reward minus the reward at the response's first position."""
        return np.diff(self.rewards, prepend=self.rewards[:1])

    def to_dict(self, dense: bool = False) -> dict:
        """JSON-ready: tokens, offsets, rewards (+ `dense`, + `top_features` when present)."""
        out = {
            "tokens": self.tokens,
            "offsets": [list(o) for o in self.offsets],
            "rewards": [float(r) for r in self.rewards],
            "reward": self.reward,
            "truncated": bool(self.truncated),
        }
        if dense:
            out["dense"] = [float(r) for r in self.dense()]
        if self.top_features is not None:
            out["top_features"] = self.top_features
        return out


def response_positions(encoded: activations.Encoded) -> np.ndarray:
    """The response's token positions through the final token (all of them when left truncation cut into the
    response, or for a text whose response start is not known: `encode_text` marks 0)."""
    return np.arange(min(encoded.response_start, len(encoded.input_ids) - 1), len(encoded.input_ids))


def token_pieces(tokenizer, ids) -> list[str]:
    """Each token's text, decoded in context so that the pieces join into the decoded sequence: a token that
    ends inside a multi-byte character gives "" and the character goes with the token that completes it."""
    ids = [int(i) for i in ids]
    pieces, done = [], 0  # done: the first token whose text is not yet out

    def decode(part):
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    for i in range(len(ids)):
        start = max(0, done - DECODE_WINDOW)
        before, text = decode(ids[start:done]), decode(ids[start : i + 1])
        if text.endswith("\ufffd") and i + 1 < len(ids):
            pieces.append("")
            continue
        pieces.append(text[len(before) :] if text.startswith(before) else decode(ids[done : i + 1]))
        done = i + 1
    return pieces


def _record(tokenizer, encoded, positions, rewards, top_features=None) -> TokenRewards:
    tokens = token_pieces(tokenizer, encoded.input_ids[positions[0] :])
    ends = np.cumsum([len(t) for t in tokens]).tolist()
    offsets = [(end - len(t), end) for t, end in zip(tokens, ends)]
    return TokenRewards(tokens, offsets, positions, np.asarray(rewards, dtype=np.float64), bool(encoded.truncated), top_features)


def _top(features: torch.Tensor, contributions: torch.Tensor, k: int) -> list[list[dict]]:
    """Per token, its k largest contributions by magnitude, zeros left out (a latent that does not fire)."""
    top = contributions.abs().topk(min(k, contributions.shape[1]), dim=1).indices
    return [
        [
            {"feature": int(f), "contribution": float(contributions[t, f]), "activation": float(features[t, f])}
            for f in row
            if contributions[t, f] != 0
        ]
        for t, row in enumerate(top.tolist())
    ]


@torch.no_grad()
def of_feature_head(model, encoded: list[activations.Encoded], batch_size: int = 16, top_k: int = 0) -> list[TokenRewards]:
    """Token rewards of tokenised sequences under a head over features (`RewardModel`, `ProjectionRewardModel`):
    the states at the response's positions come from the forward `score` runs (standardised alike), and the
    head reads them as `score_hidden` reads the final one. `top_k`: per-token top contributions (linear heads)."""
    if model._backbone is None:
        model.load_backbone(model.device)
    out: list[TokenRewards | None] = [None] * len(encoded)
    for batch in activations.length_sorted_batches([len(e.input_ids) for e in encoded], batch_size):
        seqs = [replace(encoded[i], sentence_ends=response_positions(encoded[i])) for i in batch]
        _, states, _ = activations.forward_batch(
            model._backbone, seqs, model._tokenizer.pad_token_id, model.device, True, model.standardized
        )
        for i, seq, hidden in zip(batch, seqs, states):
            top = None
            if top_k and model.linear_head:
                features = model.features(hidden)
                rewards = features @ model.weight
                top = _top(features, model.contributions(features), top_k)
            else:
                rewards = model.score_hidden(hidden)
            out[i] = _record(model._tokenizer, seq, seq.sentence_ends, rewards.numpy(), top)
    return out


@torch.no_grad()
def of_classifier(classifier, tokenizer, encoded: list[activations.Encoded], device, batch_size: int = 16) -> list[TokenRewards]:
    """Token rewards of a full-depth sequence classifier: its score layer at every response position of the
    last hidden layer, as `classifier_rewards` applies it at the final one."""
    out: list[TokenRewards | None] = [None] * len(encoded)
    base = getattr(classifier, classifier.base_model_prefix)
    for batch in activations.length_sorted_batches([len(e.input_ids) for e in encoded], batch_size):
        ids, mask = activations.pad_right([encoded[i].input_ids for i in batch], tokenizer.pad_token_id)
        hidden = base(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        for row, i in enumerate(batch):
            positions = response_positions(encoded[i])
            rewards = classifier.score(hidden[row, torch.from_numpy(positions).to(hidden.device)]).squeeze(-1).float()
            out[i] = _record(tokenizer, encoded[i], positions, rewards.cpu().numpy())
    return out


# --------------------------------------------------------------------------------------------------------
# HTML: one response, each token coloured by its reward
# --------------------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:60em;color:#222}
.response{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.9;border:1px solid #ddd;padding:1em}
.tok{border-radius:2px}.tok:hover{outline:1px solid #333}
.legend{display:flex;align-items:center;gap:.5em;margin:.5em 0}
.scale{width:16em;height:1em;background:linear-gradient(to right,#d73027,#ffffff,#1a9850);border:1px solid #ccc}
.meta{color:#555}
"""


def colour(value: float, scale: float) -> str:
    """A diverging colour centred at 0: red below, white at 0, green above; |value| >= scale is full colour."""
    x = 0.0 if scale <= 0 or not np.isfinite(value) else max(-1.0, min(1.0, value / scale))
    end = (26, 152, 80) if x > 0 else (215, 48, 39)
    r, g, b = (round(255 + (c - 255) * abs(x)) for c in end)
    return f"#{r:02x}{g:02x}{b:02x}"


def _tooltip(record: TokenRewards, t: int) -> str:
    lines = [f"r = {record.rewards[t]:+.4f}", f"Δr = {record.dense()[t]:+.4f}"]
    for f in (record.top_features or [[]] * len(record.tokens))[t]:
        lines.append(f"#{f['feature']}: w·z = {f['contribution']:+.3e} (z = {f['activation']:.3f})")
    return "\n".join(lines)


def render_html(record: TokenRewards, title: str = "Token rewards", prompt: str | None = None) -> str:
    """A self-contained page: the response with each token's background coloured by r_t (diverging scale
    centred at 0, the legend's ends at ±max |r_t|), one span per token with its value (and top features) as a
    tooltip, and the final reward. All text is escaped: responses are untrusted."""
    e = html.escape
    scale = float(np.abs(record.rewards).max()) if len(record.rewards) else 0.0
    spans = [
        f'<span class="tok" style="background:{colour(float(r), scale)}" title="{e(_tooltip(record, t))}">{e(token)}</span>'
        for t, (token, r) in enumerate(zip(record.tokens, record.rewards))
    ]
    cut = " The sequence was cut on the left to fit max_length." if record.truncated else ""
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{CSS}</style></head><body>',
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">Reward <b>{record.reward:+.4f}</b> (read at the final token). Each token is coloured by the reward '
        f"the head gives at its position; hover a token for r, Δr = r<sub>t</sub> − r<sub>t−1</sub>"
        f"{' and its largest feature contributions' if record.top_features else ''}.{cut}</p>",
        f'<div class="legend"><span>{-scale:+.3f}</span><span class="scale"></span><span>{scale:+.3f}</span></div>',
    ]
    if prompt is not None:
        parts.append(f'<h2>Prompt</h2><div class="response">{e(prompt)}</div><h2>Response</h2>')
    parts.append(f'<div class="response">{"".join(spans)}</div></body></html>\n')
    return "\n".join(parts)


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in prompt)


def write_pages(model, pairs: pd.DataFrame, out_dir: str | Path, n_pairs: int, top_k: int = 0, title: str = "") -> list[Path]:
    """Pages of the chosen and rejected responses of the first `n_pairs` pairs (scored from text) and an
    `index.html` linking them with their rewards; returns the pages written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = pairs.iloc[:n_pairs]
    prompts = pairs["prompt"].tolist() * 2
    responses = pairs["chosen"].tolist() + pairs["rejected"].tolist()
    records = model.token_rewards_batch(prompts, responses, top_k=top_k)
    rows, pages = [], []
    for i, pair in enumerate(pairs.itertuples(index=False)):
        links = []
        for side, record in (("chosen", records[i]), ("rejected", records[i + len(pairs)])):
            name = f"{i:03d}_{side}.html"
            page_title = f"{title} · pair {pair.id} · {side}".strip(" ·")
            (out_dir / name).write_text(render_html(record, page_title, _prompt_text(pair.prompt)))
            pages.append(out_dir / name)
            links.append(f'<a href="{name}">{side}</a> {record.reward:+.4f}')
        rows.append(f"<li>{html.escape(str(pair.id))}: {' · '.join(links)}</li>")
    (out_dir / "index.html").write_text(
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title or "Token rewards")}</title>'
        f"<style>{CSS}</style></head><body><h1>{html.escape(title or 'Token rewards')}</h1>"
        f'<p class="meta">The reward at every token of the chosen and rejected responses of the first {len(pairs)} pairs; '
        f'features are those of the <a href="../cards.html">feature cards</a>.</p><ul>{"".join(rows)}</ul></body></html>\n'
    )
    return pages
