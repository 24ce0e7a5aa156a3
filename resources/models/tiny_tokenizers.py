"""Offline construction of the tiny pack's tokenizers (no hub access), trained on local text.

- build_qwen2_tokenizer(): byte-level BPE trained locally with `tokenizers`, wrapped in
  transformers.Qwen2Tokenizer, with the Qwen2/2.5-VL special tokens appended in the real order.
- build_clip_tokenizer(): CLIPTokenizer from a locally trained BPE (vocab.json/merges.txt).
- build_t5_tokenizer(): T5TokenizerFast from a locally trained Unigram model (tokenizer.json).
"""
import glob
import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

QWEN_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# same order as the real Qwen2.5 tokenizer (151643..151656)
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]


QWEN_SYSTEM_PROMPTS = [
    "system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image that meets "
    "the user's requirements while maintaining consistency with the original input where appropriate.\nuser\n",
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:\nuser\n",
]


def corpus_lines() -> list[str]:
    """Some English text available offline: docstrings/comments of installed diffusers pipelines."""
    import diffusers

    root = os.path.dirname(diffusers.__file__)
    files = sorted(glob.glob(os.path.join(root, "pipelines", "qwenimage", "*.py")))
    files += sorted(glob.glob(os.path.join(root, "pipelines", "flux", "pipeline_flux.py")))
    lines = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            lines.extend(l.strip() for l in fh if l.strip())
    lines += ["dance monkey", "make the sky purple", "a photo of a cat wearing a hat", "bad quality",
              "photo of a person, close-up portrait, warm lighting"] * 20
    # Over-weight the QwenImage system prompts so every word becomes one BPE token. With this the
    # template prefixes tokenize to exactly 64 (edit/edit-plus) and 34 (t2i) tokens, matching the
    # hard-coded `prompt_template_encode_start_idx` values of the real pipelines.
    lines += QWEN_SYSTEM_PROMPTS * 200
    return lines


def build_qwen2_tokenizer(vocab_size=1024):
    from transformers import Qwen2Tokenizer

    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(corpus_lines(), trainer=trainer)
    js = json.loads(tk.to_str())
    vocab = js["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in js["model"]["merges"]]

    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)  # adds <|endoftext|> (unk/eos/pad) at len(vocab)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    tok.model_max_length = 32768
    return tok


def build_clip_tokenizer(vocab_size=1000):
    """CLIP BPE: word-level pre-tokenization with '</w>' end-of-word suffix, lowercase."""
    from transformers import CLIPTokenizer

    tk = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tk.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=alphabet,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tk.train_from_iterator(corpus_lines(), trainer=trainer)
    js = json.loads(tk.to_str())
    vocab = js["model"]["vocab"]
    # CLIP's vocab contains every byte char both with and without "</w>"
    for ch in alphabet:
        for t in (ch, ch + "</w>"):
            if t not in vocab:
                vocab[t] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in js["model"]["merges"]]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    return tok


def build_t5_tokenizer(vocab_size=1000, extra_ids=100):
    """T5: SentencePiece-style Unigram (Metaspace), pad=0, eos=1, unk=2, + <extra_id_*>."""
    from transformers import T5TokenizerFast  # == T5Tokenizer in transformers 5

    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tk.train_from_iterator(corpus_lines(), trainer=trainer)
    js = json.loads(tk.to_str())
    vocab = [tuple(v) for v in js["model"]["vocab"]]  # list of (piece, score)
    tok = T5TokenizerFast(vocab=vocab, extra_ids=extra_ids, model_max_length=512)
    return tok
