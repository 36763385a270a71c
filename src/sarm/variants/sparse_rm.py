"""`mode: sparse_rm`: SparseRM (Liu et al., "SparseRM: A Lightweight Preference Modeling with Sparse Autoencoder",
AAAI 2026, arXiv 2511.07896) on cached states of the frozen base model.

1. A frozen SAE (this project's, of `sae` kind sequence/token/random, or a public one through config key
   sae.pretrained) encodes the cached final-token states of the training pairs; each latent's mean activation
   on the chosen responses minus its mean on the rejected ones ranks it, and the top `m` are the
   preference-relevant latents.
2. Their decoder rows, scaled to unit norm, are the preference directions; a state's features are its
   projections onto them (m numbers), z-scored with the training states' mean and standard deviation.
3. A small MLP over the m projections gives the reward, trained with a margin (hinge) ranking loss on the pairs.

The trained model is a `sarm.reward_model.ProjectionRewardModel` (format `sarm-sparse-rm`). It is scored from the
base model's caches (evaluation, best-of-N) and from text, but its reward is not a sum over features: it is not
explained feature by feature, has no per-feature contributions for the RL audit (`linear_head = False`), and is no
row of the paper's Table 2 (`paper_head = False`).

Where the paper, as we could read it, is unclear, and what we chose (only its abstract and third-party summaries
were reachable here; its method section and code, github.com/ldc111521/SparseRM, were not):

- Ranking: signed (chosen minus rejected) or absolute difference? Not settled by what we read. A latent that
  fires more on rejected responses (e.g. harmful content) is as informative as one that fires more on chosen
  ones, so the default ranks by the absolute difference; `ranking: signed` keeps only the chosen-leaning ones.
  Ties (latents that never fire) break by lower latent id.
- The activations ranked: the SAE's latents as the frozen head reads them (`topk: true`: TopK as trained;
  `topk: false`: every latent's pre-activation), at the final token, the same states the head reads.
- Directions: decoder rows, normalised to unit norm (so a projection is a length along the direction, whatever
  the SAE's decoder-norm convention); the state projected is the standardised state itself (no decoder bias
  subtracted), the state the SAE encodes.
- "Alignment scores": we take the plain projection <h, d_j>; per-direction z-scoring (training-set mean and
  std, saved with the model) only conditions the MLP's inputs (the first layer could absorb it).
- The head: summaries call it "a simple / single-layer reward head"; the issue asks for a small MLP. Default
  Linear(m, 64) -> ReLU -> Linear(64, 1); `mlp_hidden: 0` gives one linear layer. The output layer has no bias
  and is zero-initialised (r = 0 at the start, as the frozen head), so a run starts at loss = margin.
- The margin loss: max(0, margin - (r_chosen - r_rejected)), mean over pairs (a margin ranking loss), `margin`
  1.0 by default (it must be > 0: at margin 0 the zero-initialised head gets no gradient).
- m = 128 as in the paper; m must not exceed the SAE's width (checked when training, where the width is known).
- Training recipe: config key `reward` (epochs, lr, batch_size, weight_decay; AdamW) and the config's seed, in
  the frozen head's loop (`sarm.reward.fit_pairs`): the epoch with the best validation accuracy is kept (lower
  validation loss breaks ties), and a killed job resumes from its last epoch. `length_debias` wraps the hinge
  loss as it wraps the frozen head's BT loss (`sarm.length_debias`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sarm.errors import SarmError
from sarm.variants.frozen import FrozenHead
from sarm.variants.spec import Cost, check_length_debias, register

RANKINGS = ("absolute", "signed")
SELECTION_BATCH = 1024  # rows encoded at once when ranking (even: a chunk never splits a pair)


@register("sparse_rm")
@dataclass(frozen=True)
class SparseRM(FrozenHead):
    m: int = 128  # preference-relevant latents kept (the paper: 128)
    mlp_hidden: int = 64  # the MLP's hidden width; 0: one linear layer
    margin: float = 1.0  # of the hinge loss max(0, margin - (r_chosen - r_rejected))
    ranking: str = "absolute"  # rank latents by |mean difference| or by the signed difference

    paper_head = False
    linear_head = False

    @classmethod
    def check(cls, key: str, given: dict) -> None:
        if given.get("features", "sae") != "sae":
            raise SarmError(f"{key}.features: sparse_rm projects on SAE decoder directions, so it needs features: sae")
        for name, low in (("m", 1), ("mlp_hidden", 0)):
            value = given.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise SarmError(f"{key}.{name}: {value!r} must be an integer >= {low}")
        margin = given.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin > 0):
            raise SarmError(f"{key}.margin: {margin!r} must be a number > 0")
        if given.get("ranking", "absolute") not in RANKINGS:
            raise SarmError(f"{key}.ranking: {given['ranking']!r} is not one of {', '.join(RANKINGS)}")
        check_length_debias(key, given)

    # --- cost: the frozen head's, with the MLP over m projections in place of the linear head over latents ---
    def _mlp_flops(self) -> float:
        return 2 * (self.m * max(self.mlp_hidden, 1) + self.mlp_hidden)

    def training_cost(self, config: dict, shape, gpu: bool) -> Cost:
        from sarm.cluster import BASE_MB, mb, table_pairs

        h = shape.hidden_size
        _, width = self._widths(config, shape)
        sequences = 2 * (table_pairs(config, "train") + table_pairs(config, "val"))
        host = BASE_MB + mb(sequences * (h + self.m) * 4 * 1.5 + SELECTION_BATCH * width * 4 + 2 * h * width * 4)
        selection = 2 * table_pairs(config, "train") * h * width * 2  # one SAE pass over the training states
        flops = selection + sequences * h * self.m * 2 + config["reward"]["epochs"] * sequences * self._mlp_flops() * 3
        return Cost(host, 0, flops, 0)

    def scoring_cost(self, config: dict, shape, table: str, gpu: bool) -> Cost:
        from sarm.cluster import BASE_MB, mb, table_pairs

        h = shape.hidden_size
        sequences = 2 * table_pairs(config, table)
        host = BASE_MB + mb(sequences * (h + self.m) * 4 * 1.5)
        return Cost(host, 0, sequences * (h * self.m * 2 + self._mlp_flops()), 0)

    # --- training ---
    def fit_cached(
        self, train, val, model_dir, model_spec: dict, settings: dict, sae=None, seed: int = 0, log=None, checkpoint_root=None
    ):
        """Select the top-m latents on `train` (an ActivationCache), train the MLP on `train`, keep the epoch best
        on `val`: (a `ProjectionRewardModel`, one history row per epoch as `sarm.reward.train_head` writes)."""
        import torch

        from sarm import checkpoints
        from sarm.length_debias import cached_differences, length_debias
        from sarm.reward import cached_model_config, checkpoint_fingerprint, record_selection
        from sarm.reward_model import ProjectionRewardModel, set_topk

        if sae is None:
            raise SarmError(f"reward model {self.name}: sparse_rm needs its SAE")
        width = sae.cfg.d_sae
        if self.m > width:
            raise SarmError(f"config key reward_models.{self.name}.m: {self.m} is more than the SAE's {width} latents")
        set_topk(sae, self.topk)
        hidden = train.final().float()
        latents, differences = select_latents(sae, hidden, self.m, self.ranking)
        decoder = sae.W_dec.detach().float().cpu()[latents]
        directions = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
        projections = hidden @ directions.T
        tensors = {
            "directions": directions,
            "proj_mean": projections.mean(0),
            "proj_std": projections.std(0).nan_to_num(1.0).clamp_min(1e-6),  # std of one row is nan
        }
        config = cached_model_config(self.as_dict(), train, model_dir, model_spec, settings, seed)
        config["format"] = "sarm-sparse-rm"
        config["sparse_rm"] = {
            "m": self.m,
            "mlp_hidden": self.mlp_hidden,
            "margin": self.margin,
            "ranking": self.ranking,
            "sae_width": width,
            "latents": latents.tolist(),
            "mean_difference": differences.tolist(),  # mean on chosen minus mean on rejected, per selected latent
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ProjectionRewardModel(config, {**tensors, **initial_mlp(self.m, self.mlp_hidden)})
        if checkpoint_root is not None:
            checkpoint_root = checkpoints.open_root(checkpoint_root, checkpoint_fingerprint(config, train, val))
        differences = cached_differences(train) if self.length_debias else None
        debias = length_debias(self.as_dict(), differences)
        history = train_mlp(
            model,
            projections,
            val.final().float() @ directions.T,
            settings,
            self.margin,
            seed,
            log,
            checkpoint_root,
            debias,
            differences,
        )
        record_selection(config, history, debias)
        return model, history


def initial_mlp(m: int, hidden: int) -> dict:
    """Initial MLP weights: PyTorch's default for the hidden layer (under the caller's seed), a zero output layer."""
    import torch

    from sarm.reward_model import build_mlp

    mlp = build_mlp(m, hidden)
    torch.nn.init.zeros_(mlp[-1].weight)
    return {f"mlp.{k}": v.detach() for k, v in mlp.state_dict().items()}


def mean_differences(sae, hidden, batch_size: int = SELECTION_BATCH):
    """Per latent: mean activation over the chosen rows (2i) minus mean over the rejected rows (2i+1) of `hidden`,
    encoding `batch_size` rows at a time (never the whole [n, d_sae] matrix)."""
    import torch

    from sarm.reward_model import sae_features

    if len(hidden) % 2 or not len(hidden):
        raise SarmError(f"SparseRM: {len(hidden)} cached training rows are not chosen/rejected pairs")
    batch_size += batch_size % 2
    total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for start in range(0, len(hidden), batch_size):
        z = sae_features(sae, hidden[start : start + batch_size], batch_size).double()
        total += z[0::2].sum(0) - z[1::2].sum(0)
    return (total / (len(hidden) // 2)).float()


def select_latents(sae, hidden, m: int, ranking: str = "absolute"):
    """The top-m latents by mean activation difference (chosen minus rejected), |difference| or signed; ties go
    to the lower latent id. Returns (latent ids [m], their signed mean differences [m])."""
    import numpy as np
    import torch

    differences = mean_differences(sae, hidden)
    key = differences.abs() if ranking == "absolute" else differences
    order = np.argsort(-key.numpy(), kind="stable")[:m]
    latents = torch.from_numpy(order.copy()).long()
    return latents, differences[latents]


def train_mlp(
    model,
    train,
    val,
    settings: dict,
    margin: float,
    seed: int = 0,
    log=None,
    checkpoint_root=None,
    debias=None,
    differences=None,
):
    """Train `model`'s MLP (a ProjectionRewardModel) on paired projection rows (`train`, `val`: [2n, m], rows
    2i / 2i+1 chosen / rejected) with the margin loss, in `sarm.reward.fit_pairs` (AdamW, the epoch with the best
    validation accuracy kept, checkpoints; `debias`, `differences`: its length-debiased loss); leave it at that
    epoch. Returns one history row per epoch."""
    import torch

    from sarm.reward import fit_pairs, optimiser

    parameters = list(model.mlp.train().requires_grad_(True).parameters())

    def hinge(reward_margin):
        return torch.relu(margin - reward_margin).mean()

    _, history = fit_pairs(
        parameters,
        model.head,
        train,
        val,
        **optimiser(settings),
        seed=seed,
        log=log,
        checkpoint_root=checkpoint_root,
        loss=hinge,
        val_loss=hinge,
        what="SparseRM training",
        debias=debias,
        differences=differences,
    )
    model.mlp.eval().requires_grad_(False)  # fit_pairs left it at the kept epoch
    return history
