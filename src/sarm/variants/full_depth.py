"""`mode: full_depth`: a conventional reward model, AutoModelForSequenceClassification (all layers, the final norm,
a 1-output score head) trained end to end with the same BT loss, saved as a Hugging Face sequence classifier."""

from __future__ import annotations

from dataclasses import dataclass

from sarm.errors import SarmError
from sarm.variants.spec import TRAINING_KEYS, check_length_debias, register
from sarm.variants.tuned import EndToEnd


@register("full_depth")
@dataclass(frozen=True)
class FullDepth(EndToEnd):
    features: str = "hidden"
    sae: str | None = None
    topk: bool | None = None
    feature_head = False

    @classmethod
    def check(cls, key: str, given: dict) -> None:
        if set(given) - set(TRAINING_KEYS):
            raise SarmError(
                f"{key}: a full_depth model is a sequence classifier; give only mode (and {', '.join(TRAINING_KEYS)})"
            )
        check_length_debias(key, given)

    def _parameters(self, config: dict, shape) -> tuple[float, float]:
        return shape.params_b * 1e9, 0

    def _layers(self, config: dict, shape) -> int:
        return shape.num_hidden_layers

    def build_trainable(self, model_dir, model_spec: dict, sae, tokenizer):
        import torch
        from transformers import AutoModelForSequenceClassification

        from sarm.finetune import ClassifierForReward

        classifier = AutoModelForSequenceClassification.from_pretrained(
            model_dir,
            num_labels=1,
            dtype=torch.float32,
            trust_remote_code=model_spec.get("trust_remote_code", False),
            use_safetensors=True,
        )
        classifier.config.pad_token_id = tokenizer.pad_token_id
        return ClassifierForReward(classifier)
