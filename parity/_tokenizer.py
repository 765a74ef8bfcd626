"""Granite-like byte-level BPE tokenizer built locally with `tokenizers` (no hub).

Layout of the ids (as in granite-speech-3.3):
  0..18                 the StarCoder special tokens (`<|end_of_text|>` = 0)
  19..                  byte alphabet + BPE merges learned on fixtures/text/tokenizer_corpus.txt
  ..vocab_size-9        filler tokens (unreachable from text) when the corpus is too small to fill the vocab
  vocab_size-8..        the Granite added tokens, `<|audio|>` last (= the config's audio_token_index)
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

FIXTURES_DIR = Path(__file__).resolve().parent.parent / "fixtures"
CORPUS_PATH = FIXTURES_DIR / "text" / "tokenizer_corpus.txt"

END_OF_TEXT = "<|end_of_text|>"
AUDIO_TOKEN = "<|audio|>"
STARCODER_SPECIAL_TOKENS = (
    END_OF_TEXT,
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<reponame>",
)
GRANITE_ADDED_TOKENS = (
    "<|start_of_role|>",
    "<|end_of_role|>",
    "<|tool_call|>",
    "<|start_of_cite|>",
    "<|end_of_cite|>",
    "<|start_of_plugin|>",
    "<|end_of_plugin|>",
    AUDIO_TOKEN,
)
BYTE_ALPHABET_SIZE = 256
MIN_BASE_VOCAB = len(STARCODER_SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE

# A reduced Granite 3.x chat template: role headers, optional generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)


def _vocab_layout(hf_config: dict) -> tuple[int, int]:
    """Return (vocab_size, base_vocab_size) after checking the config puts `<|audio|>` last."""
    try:
        vocab_size = int(hf_config["text_config"]["vocab_size"])
        audio_token_index = int(hf_config["audio_token_index"])
    except KeyError as err:
        raise ValueError(f"hf_config needs text_config.vocab_size and audio_token_index; missing {err}") from err
    if audio_token_index != vocab_size - 1:
        raise ValueError(
            f"audio_token_index must be the last id (vocab_size - 1 = {vocab_size - 1}) because the Granite "
            f"added tokens come last; got audio_token_index={audio_token_index}, vocab_size={vocab_size}"
        )
    base_vocab_size = vocab_size - len(GRANITE_ADDED_TOKENS)
    if base_vocab_size < MIN_BASE_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: need at least {MIN_BASE_VOCAB + len(GRANITE_ADDED_TOKENS)} "
            f"({len(STARCODER_SPECIAL_TOKENS)} special + {BYTE_ALPHABET_SIZE} bytes "
            f"+ {len(GRANITE_ADDED_TOKENS)} added)"
        )
    return vocab_size, base_vocab_size


def _train_bpe(base_vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn byte-level BPE merges on the corpus; returns (vocab, merges) of at most base_vocab_size entries."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab_size,
        special_tokens=list(STARCODER_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(CORPUS_PATH)], trainer)
    model_json = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    return dict(model_json["vocab"]), merges


def _assemble(vocab: dict[str, int], merges: list, base_vocab_size: int) -> Tokenizer:
    vocab = dict(vocab)
    for filler_index in range(base_vocab_size - len(vocab)):
        # Unreachable from text: the byte-level pre-tokenizer splits on '<', '|' and '_' before BPE.
        vocab[f"<|filler_{filler_index:05d}|>"] = len(vocab)
    if sorted(vocab.values()) != list(range(base_vocab_size)):
        raise RuntimeError("internal error: BPE vocab ids are not contiguous")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # Same pipeline transformers 5.x GPT2Tokenizer rebuilds from vocab/merges, so 4.x and 5.x agree.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in STARCODER_SPECIAL_TOKENS])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GRANITE_ADDED_TOKENS])
    return tokenizer


def _tokenizer_config(tokenizer: Tokenizer) -> dict:
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in STARCODER_SPECIAL_TOKENS + GRANITE_ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(GRANITE_ADDED_TOKENS[:-1]) + [AUDIO_TOKEN],
        "bos_token": END_OF_TEXT,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": END_OF_TEXT,
        "errors": "replace",
        "model_max_length": 9223372036854775807,
        "pad_token": END_OF_TEXT,
        "padding_side": "left",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": END_OF_TEXT,
    }


def build_tokenizer(out_dir: Path, hf_config: dict) -> None:
    """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json to out_dir.

    The vocabulary size and the `<|audio|>` id come from hf_config (text_config.vocab_size, audio_token_index).
    """
    vocab_size, base_vocab_size = _vocab_layout(hf_config)
    vocab, merges = _train_bpe(base_vocab_size)
    tokenizer = _assemble(vocab, merges, base_vocab_size)
    if tokenizer.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(f"internal error: built {tokenizer.get_vocab_size()} tokens, expected {vocab_size}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer.model.save(str(out_dir))  # vocab.json + merges.txt for the slow GPT2 tokenizer
    config = _tokenizer_config(tokenizer)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_tokens_map = {
        k: config[k] for k in ("additional_special_tokens", "bos_token", "eos_token", "pad_token", "unk_token")
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2) + "\n")
