"""Model folders for `--load-format dummy` runs: Gemma4 26B-A4B-it and its MTP assistant draft.

No weights are written (sglang initialises them at random); each folder holds a config.json with
the real shape and a tiny word-level tokenizer, so the whole serving path runs without a download.

    python -m sglang_gemma4_opt.tools.dummy_model DIR      # writes DIR/target and DIR/draft

Target: the shape that ran on the GPU host (shared/gpu-host/make_dummy_gemma4.py): model_type
`gemma4` with a `text_config`, since sglang derives the sliding-layer `swa_*` attributes only for
that wrapper.

Draft: what sglang 0.5.12's `Gemma4AssistantForCausalLM` (srt/models/gemma4_mtp.py) reads:
`architectures` names the class (server_args then promotes NEXTN/EAGLE to FROZEN_KV_MTP),
`backbone_hidden_size` = the target's hidden size (pre_projection takes 2x it, post_projection
returns it), `use_ordered_embeddings` (the centroid head of E2B/E4B; off for 26B-A4B) and a
`text_config` for its own decoder stack. The assistant reads the target's KV cache of the last
sliding and the last full layer, so its attention shape (heads, head dims, kv heads, k_eq_v,
sliding window) must equal the target's. Its own size follows public reports of
google/gemma-4-26B-A4B-it-assistant: 4 dense layers (3 sliding + 1 full), hidden 1024,
intermediate 8192 (not verified against the checkpoint, which cannot be downloaded here).
`model_type` is `gemma4_assistant` when the installed transformers knows it (>= 5.10); otherwise
(sglang 0.5.12 pins transformers 5.6.0) `gemma4`, whose config class keeps the extra keys and
which sglang's config parser treats the same way.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

LAYER_TYPES = (["sliding_attention"] * 5 + ["full_attention"]) * 5

TARGET_TEXT = {
    "model_type": "gemma4_text",
    "hidden_size": 2816, "num_hidden_layers": 30, "intermediate_size": 2112,
    "num_attention_heads": 16, "num_key_value_heads": 8, "num_global_key_value_heads": 2,
    "head_dim": 256, "global_head_dim": 512, "vocab_size": 262144, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144, "sliding_window": 1024, "final_logit_softcapping": 30.0,
    "attention_k_eq_v": True, "enable_moe_block": True, "num_experts": 128, "top_k_experts": 8,
    "moe_intermediate_size": 704, "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0, "use_double_wide_mlp": False,
    "layer_types": LAYER_TYPES,
    "rope_parameters": {
        "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    },
    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "torch_dtype": "bfloat16",
}

# The assistant's own stack; everything not named here is inherited from the target's text config
# (attention shape, vocab, rope, sliding window), which it must share to read the target's KV.
DRAFT_OWN = {
    "hidden_size": 1024, "intermediate_size": 8192, "num_hidden_layers": 4,
    "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
    "enable_moe_block": False, "num_experts": None, "top_k_experts": None, "moe_intermediate_size": None,
    "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0, "use_double_wide_mlp": False,
    # HF's Gemma4AssistantConfig: every assistant layer reuses target KV (sglang resets this to 0
    # for its own module construction and binds the target's cache instead).
    "num_kv_shared_layers": 4,
}


def target_config() -> dict:
    # The marker-token ids are written out: sglang's Gemma4 multimodal processor reads all seven from
    # the config, and transformers 5.6.0's Gemma4Config has no default for some (eoa_token_id).
    ids = {f"{k}_id": i for k, (_, i) in MM_TOKENS.items()}
    return {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
            "text_config": copy.deepcopy(TARGET_TEXT), "vision_config": {"model_type": "gemma4_vision"},
            "audio_config": None, "tie_word_embeddings": True, "eos_token_id": 1, "pad_token_id": 0,
            "bos_token_id": 2, "torch_dtype": "bfloat16", **ids}


def transformers_knows(model_type: str) -> bool:
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return model_type in CONFIG_MAPPING
    except Exception:
        return False


def draft_config(model_type: str = "auto") -> dict:
    if model_type == "auto":
        model_type = "gemma4_assistant" if transformers_knows("gemma4_assistant") else "gemma4"
    text = dict(copy.deepcopy(TARGET_TEXT), **copy.deepcopy(DRAFT_OWN))
    return {"architectures": ["Gemma4AssistantForCausalLM"], "model_type": model_type,
            "text_config": text, "backbone_hidden_size": TARGET_TEXT["hidden_size"],
            "use_ordered_embeddings": False, "num_centroids": 2048, "centroid_intermediate_top_k": 32,
            "tie_word_embeddings": True, "eos_token_id": 1, "pad_token_id": 0, "bos_token_id": 2,
            "torch_dtype": "bfloat16"}


# Gemma4Config's default ids of the multimodal marker tokens; the processor and sglang's Gemma4
# multimodal processor look these tokens up, so the tokenizer must know them under these ids.
MM_TOKENS = {"image_token": ("<|image|>", 258880), "boi_token": ("<|image>", 255999),
             "eoi_token": ("<image|>", 258882), "video_token": ("<|video|>", 258884),
             "audio_token": ("<|audio|>", 258881), "boa_token": ("<|audio>", 256000),
             "eoa_token": ("<audio|>", 258883)}
SPECIAL = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{t: i for t, i in MM_TOKENS.values()}}


def tokenizer_json(vocab_size: int = TARGET_TEXT["vocab_size"]) -> dict:
    """A word-level tokenizer in the `tokenizers` JSON format, written by hand so that writing the
    folders needs no `tokenizers` package. One word per id (t<id>) up to the model's vocab size, so
    every id a random model emits decodes to text; the special tokens sit at the ids the config
    names. Prompt words are not in the vocab and map to <unk>: the prompts' length, not their
    meaning, is what a dummy run needs."""
    by_id = {i: t for t, i in SPECIAL.items()}
    vocab = {by_id.get(i, f"t{i}"): i for i in range(vocab_size)}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t, i in sorted(SPECIAL.items(), key=lambda x: x[1])]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
            "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}


CHAT_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
                    "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 262144,
                    "extra_special_tokens": {k: t for k, (t, _) in MM_TOKENS.items() if k != "video_token"},
                    # sglang's server warm-up sends a chat request; a minimal Gemma-style template
                    "chat_template": CHAT_TEMPLATE}

# The target is Gemma4ForConditionalGeneration, which sglang serves as a multimodal model: its
# tokenizer manager loads the HF processor (Gemma4Processor) from the folder. The sub-processors
# are described inline (transformers reads nested configs from processor_config.json) with their
# classes' defaults; no image or audio is ever sent.
PROCESSOR_CONFIG = {"processor_class": "Gemma4Processor", "image_seq_length": 280, "audio_seq_length": 750,
                    "audio_ms_per_token": 40,
                    "feature_extractor": {"feature_extractor_type": "Gemma4AudioFeatureExtractor"},
                    "image_processor": {"image_processor_type": "Gemma4ImageProcessor"},
                    "video_processor": {"video_processor_type": "Gemma4VideoProcessor"}}


def write_folder(path: str | Path, config: dict, processor: bool = False) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    (p / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (p / "tokenizer.json").write_text(json.dumps(tokenizer_json(config["text_config"]["vocab_size"])) + "\n")
    (p / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=1) + "\n")
    if processor:
        (p / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=1) + "\n")
    return p


def write_dummy_models(root: str | Path, draft_model_type: str = "auto") -> tuple[Path, Path]:
    """DIR/target and DIR/draft; returns their paths."""
    root = Path(root)
    return (write_folder(root / "target", target_config(), processor=True),
            write_folder(root / "draft", draft_config(draft_model_type)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--draft-model-type", default="auto", choices=["auto", "gemma4_assistant", "gemma4"])
    a = ap.parse_args(argv)
    t, d = write_dummy_models(a.dir, a.draft_model_type)
    print(f"target: {t}\ndraft:  {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
