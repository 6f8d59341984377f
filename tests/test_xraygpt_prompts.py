"""XrayGPT's text side (issue 16): prompt strings for a report and a two-turn dialog (byte for byte, from
the reference's conversation template), their ids and the image splice, "###" stopping and the answer's
post-processing, streaming, and the context rule."""

from __future__ import annotations

import re

import numpy as np
import pytest
import sentencepiece as spm
import torch

from workers.models.base import ContextTooLong, DialogRequest, StudyInput, Turn, UnsupportedTask
from workers.models.xraygpt import prompts
from workers.models.xraygpt.backend import REFERENCE_STOPS, AnswerStreamer, XrayGPTBackend, stop_sequences, trim
from workers.models.xraygpt.loader import load_xraygpt
from workers.models.xraygpt.tiny import TinyPaths, make_tiny

SYSTEM = (
    "You are an experienced Doctor, give the following medical scan: <Img>ImageContent</Img>. You will be "
    "able to see the medical scan once I provide it to you. Please answer my questions."
)
REPORT_PROMPT = SYSTEM + "###Patient: <Img><ImageHere></Img> Describe the given chest x-ray image in detail.###Doctor:"
TWO_TURNS = (
    SYSTEM + "###Patient: <Img><ImageHere></Img> Describe the given chest x-ray image in detail.###Doctor: "
    "The heart is enlarged. Small effusions.###Patient: Is there a pneumothorax?###Doctor: No.###Patient: "
    "Based on the findings in this chest x-ray image, what is the overall impression?###Doctor:"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyPaths:
    return make_tiny(tmp_path_factory.mktemp("xraygpt"))


@pytest.fixture(scope="module")
def backend(tiny: TinyPaths) -> XrayGPTBackend:
    return XrayGPTBackend(load_xraygpt(tiny.vision_dir, tiny.llm_dir, tiny.checkpoint, "cpu"))


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (260 + seed, 240), dtype=np.uint8)


def test_report_and_two_turn_prompts_are_the_reference_text() -> None:
    assert prompts.SYSTEM == SYSTEM
    assert prompts.conversation_prompt([], prompts.REPORT_QUESTION) == REPORT_PROMPT
    history = [
        Turn(prompts.REPORT_QUESTION, "The heart is enlarged. Small effusions."),
        Turn("Is there a pneumothorax?", "No."),
    ]
    assert prompts.conversation_prompt(history, prompts.IMPRESSION) == TWO_TURNS
    # an empty earlier answer reads as the reference's get_prompt writes it: the open "Doctor:" role
    assert prompts.conversation_prompt([Turn(prompts.REPORT_QUESTION, "")], "Why?") == (
        SYSTEM + "###Patient: <Img><ImageHere></Img> Describe the given chest x-ray image in detail.###Doctor:"
        "Patient: Why?###Doctor:"
    )


def _sentencepiece(tiny: TinyPaths) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny.llm_dir / "tokenizer.model"))


def slow_legacy_ids(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """What the reference's slow ``LlamaTokenizer`` (transformers 4.28: legacy rules, no <s>) makes of ``text``:
    cut at the special tokens, each becomes its id, every text piece between them encoded by sentencepiece
    with its dummy prefix."""
    ids: list[int] = []
    for piece in re.split(r"(<s>|</s>|<unk>)", text):
        if piece in ("<s>", "</s>", "<unk>"):
            ids.append(sp.piece_to_id(piece))
        elif piece:
            ids.extend(sp.encode(piece))
    return ids


#: A user's question and an edited report holding special-token text: the legacy rules give the text after
#: each one the dummy "▁" (transformers' fast tokenizer, and the non-legacy slow one, do not).
TYPED_SPECIALS = (
    SYSTEM + "###Patient: <Img><ImageHere></Img> Describe the given chest x-ray image in detail.###"
    "Doctor: Normal heart.</s>No effusion.###Patient: Is it </s>normal or <unk>x<s>y?###Doctor:"
)


def test_ids_and_splice_follow_get_context_emb(backend: XrayGPTBackend, tiny: TinyPaths) -> None:
    """Each segment around <ImageHere> is encoded on its own by the slow sentencepiece tokenizer's legacy rules
    (each gets sentencepiece's dummy prefix, so does text after a special token), whatever the tokenizer
    files say; only the first gets <s>; the 32 query embeddings sit between them."""
    sp = _sentencepiece(tiny)
    assert '"legacy": false' in (tiny.llm_dir / "tokenizer_config.json").read_text()  # the rules are the code's
    for prompt in (REPORT_PROMPT, TWO_TURNS, TYPED_SPECIALS):
        before_text, after_text = prompt.split("<ImageHere>")
        before, after = backend.prompt_segments(prompt)
        assert before == [1, *slow_legacy_ids(sp, before_text)]
        assert after == slow_legacy_ids(sp, after_text)
        assert after[0] == sp.piece_to_id("▁</") or sp.id_to_piece(after[0]).startswith("▁")  # the dummy prefix
        assert backend.count_tokens(prompt) == len(before) + 32 + len(after)

    pixels = torch.stack([torch.from_numpy(np.zeros((3, 224, 224), dtype=np.float32))])
    with torch.inference_mode():
        (row,) = backend.embed([REPORT_PROMPT], pixels)
        embeds = backend.model.llama_model.get_input_embeddings()
        before, after = backend.prompt_segments(REPORT_PROMPT)
        image_rows = backend.model.encode_images(pixels)[0]
    assert row.shape == (len(before) + 32 + len(after), 64)
    cut = len(before)
    assert torch.equal(row[:cut], embeds(torch.tensor(before)))
    assert torch.equal(row[cut : cut + 32], image_rows)
    assert torch.equal(row[cut + 32 :], embeds(torch.tensor(after)))
    with pytest.raises(ValueError, match="must hold <ImageHere>"):
        backend.prompt_segments(SYSTEM + "###Patient: no image###Doctor:")
    # a user's "<ImageHere>" (a question, an edited report) stays text: the image goes at the first one
    typed = prompts.conversation_prompt([Turn(prompts.REPORT_QUESTION, "See <ImageHere> here.")], "And <ImageHere>?")
    before_typed, after_typed = backend.prompt_segments(typed)
    assert before_typed == before and after_typed == slow_legacy_ids(sp, typed.split("<ImageHere>", 1)[1])


def test_stop_ids_are_the_references_for_the_real_vocabulary() -> None:
    class RealVocabulary:
        """The three pieces of the LLaMA vocabulary the reference's stop ids name."""

        def __len__(self) -> int:
            return 32000

        def convert_ids_to_tokens(self, ids):
            table = {835: "###", 2277: "##", 29937: "#"}
            return table[ids] if isinstance(ids, int) else [table[i] for i in ids]

    assert stop_sequences(RealVocabulary()) == REFERENCE_STOPS == ((835,), (2277, 29937))


def test_stopping_and_post_processing(backend: XrayGPTBackend) -> None:
    stops = backend.stops
    assert stops, "the tiny vocabulary must spell ### somehow"
    hash_ids = list(stops[-1])
    eos = backend.eos_id
    words = backend.tokenizer("Mild cardiomegaly.", add_special_tokens=False).input_ids
    # up to and including the first stop sequence, or up to EOS, whichever comes first
    assert trim([*words, *hash_ids, *words], eos, stops) == [*words, *hash_ids]
    assert trim([*words, eos, *hash_ids], eos, stops) == words
    assert trim(words, eos, stops) == words
    # the reference's post-processing: cut at ###, after the last "Doctor:", strip, ChatDoctor -> XrayGPT
    assert prompts.postprocess(" Mild cardiomegaly.###Patient: thanks") == "Mild cardiomegaly."
    assert prompts.postprocess("Patient asked. Doctor: ChatDoctor sees a Chat Doctor effusion.") == (
        "XrayGPT sees a XrayGPT effusion."
    )
    # ids: a leading <unk> then <s> are dropped before decoding
    assert backend.text([0, 1, *words, *hash_ids, *words]) == "Mild cardiomegaly."
    assert backend.text([1, *words]) == "Mild cardiomegaly."


def test_streamed_pieces_add_up_to_the_answer_and_hold_back_what_may_change(backend: XrayGPTBackend) -> None:
    pieces: list[str] = []
    streamer = AnswerStreamer(backend, pieces.append)
    text = "The Chat Doctor sees mild cardiomegaly."
    ids = backend.tokenizer(text, add_special_tokens=False).input_ids + list(backend.stops[-1])
    ids += backend.tokenizer(" ignored after the stop", add_special_tokens=False).input_ids
    seen = []
    for token in ids:
        streamer.put(torch.tensor([token]))
        seen.append("".join(pieces))
    streamer.end()
    assert "".join(pieces) == "The XrayGPT sees mild cardiomegaly."
    assert not any("Chat" in s for s in seen), seen  # "Chat" was held until it became "XrayGPT"

    pieces.clear()
    answer = backend.answer(
        DialogRequest(image(1), [Turn(prompts.REPORT_QUESTION, "Normal.")], "Any effusion?"), on_token=pieces.append
    )
    assert "".join(pieces) == answer


def test_report_is_the_describe_question_and_dialog_tasks_are_checked(backend: XrayGPTBackend) -> None:
    outputs = backend.report([StudyInput("a", image(1)), StudyInput("b", image(2))], max_new_tokens=12)
    assert [o.key for o in outputs] == ["a", "b"]
    for out in outputs:
        assert out.findings == [] and out.findings_phrase == "" and 0 < out.generated_tokens <= 12
    (alone,) = backend.report([StudyInput("a", image(1))], max_new_tokens=12)
    assert alone.findings_text == outputs[0].findings_text
    report = Turn(prompts.REPORT_QUESTION, outputs[0].findings_text)
    with pytest.raises(UnsupportedTask):
        backend.dialog_prompt(DialogRequest(image(1), [report], "Is there any edema?", task="yes_no"))
    prompt, limit = backend.dialog_prompt(DialogRequest(image(1), [report], prompts.IMPRESSION, task="impression"))
    assert prompt == prompts.conversation_prompt([report], prompts.IMPRESSION) and limit == 32  # tiny cap


def test_context_rule_drops_old_follow_ups_then_refuses(backend: XrayGPTBackend) -> None:
    """2,000 positions for prompt + new tokens (the reference's max_length); whole follow-up turns go first."""
    report = Turn(prompts.REPORT_QUESTION, "Mild cardiomegaly.")
    chatter = [Turn(f"Question {i}? " + "Describe the heart. " * 40, "No. " * 60) for i in range(8)]
    request = DialogRequest(image(1), [report, *chatter], "And the lungs?", max_new_tokens=300)
    prompt, _ = backend.dialog_prompt(request)
    assert backend.count_tokens(prompt) + 300 <= 2000
    assert prompt.startswith(prompts.conversation_prompt([report], "x").split("###Doctor: Mild")[0])
    assert "Question 7?" in prompt and "Question 0?" not in prompt
    with pytest.raises(ContextTooLong):
        backend.dialog_prompt(DialogRequest(image(1), [Turn(prompts.REPORT_QUESTION, "word " * 3000)], "Why?"))
