"""`mode: frozen`: a linear Bradley-Terry head on cached features of the frozen base model (the SARM head on SAE
latents, or the dense baseline on the standardised hidden state); training: `sarm.reward.fit_reward_model`."""

from __future__ import annotations

from sarm.variants.spec import Cost, RewardModelSpec, register


@register("frozen")
class FrozenHead(RewardModelSpec):
    trains_on_cache = True
    own_backbone = False
    feature_head = True
    paper_head = True

    def _widths(self, config: dict, shape) -> tuple[int, int]:
        from sarm.cluster import sae_shape

        width, _ = sae_shape(config, shape.hidden_size)
        return (width if self.features == "sae" else shape.hidden_size), width

    def training_cost(self, config: dict, shape, gpu: bool) -> Cost:
        from sarm.cluster import BASE_MB, mb, table_pairs

        h = shape.hidden_size
        features, width = self._widths(config, shape)
        sequences = 2 * (table_pairs(config, "train") + table_pairs(config, "val"))
        host = BASE_MB + mb(sequences * (features + h) * 4 * 1.5)  # dense feature matrix + hidden states
        flops = config["reward"]["epochs"] * sequences * features * 6 + (
            sequences * h * width * 2 if self.features == "sae" else 0
        )
        return Cost(host, 0, flops, 0)

    def scoring_cost(self, config: dict, shape, table: str, gpu: bool) -> Cost:
        from sarm.cluster import BASE_MB, mb, table_pairs

        h = shape.hidden_size
        features, width = self._widths(config, shape)
        sequences = 2 * table_pairs(config, table)
        sae = self.features == "sae"
        host = BASE_MB + mb(sequences * (features + h) * 4 * 1.5 + (2 * h * width * 4 if sae else 0))
        return Cost(host, 0, sequences * h * width * 2 if sae else 0, 0)

    def fit_cached(
        self, train, val, model_dir, model_spec: dict, settings: dict, sae=None, seed: int = 0, log=None, checkpoint_root=None
    ):
        from sarm.reward import fit_reward_model

        return fit_reward_model(self.as_dict(), train, val, model_dir, model_spec, settings, sae, seed, log, checkpoint_root)
