"""Fine-tuning data: the loss mask of the default and chat_template renderings, token by
token; the shards prepare_sft writes and load_sft_split reads back (checked); SFTBatches:
shifted labels, batches independent of the DP split, exact resume, re-dealing to another
layout, damaged states."""
import collections
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gptscale.data.read import read_shard
from gptscale.data.sft import (ChatTemplate, DefaultTemplate, SFTBatches, SFTExamples, answer_examples, choose_template,
                               epoch_order, fit_to_length, is_sft_folder, load_sft_split, prepare_sft,
                               record_messages, redeal_sft_state, tokenize_conversations, validation_batches_sft)
from gptscale.data.shards import MANIFEST, _tar_member, file_sha256, npy_bytes, read_manifest
from gptscale.data.sources import embedded_documents
from gptscale.data.tokenizer import TextTokenizer, train_tokenizer
from gptscale.errors import DataError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, of course."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [text for _, text in embedded_documents("pydoc")][:300]
    texts += ["User: what is it?\nAssistant: It is here."] * 20  # merges that would cross the mask boundary
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok"))


def template_tokenizer(tokenizer, folder, template):
    """A copy of `tokenizer` whose tokenizer_config.json has `template` as its chat_template."""
    shutil.copytree(folder_of(tokenizer), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return TextTokenizer.load(folder)


def folder_of(tokenizer):
    return Path(tokenizer.path).parent


def labelled_runs(tokenizer, example):
    """The decoded text of each run of consecutive labelled tokens."""
    runs, current = [], []
    for token, learned in zip(example.ids.tolist(), example.mask.tolist()):
        if learned:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# -- records -> tokens + mask ---------------------------------------------------------------------

def test_default_mask_is_exactly_each_assistant_turn_and_its_eos(tokenizer):
    [example] = tokenize_conversations([CHAT], tokenizer, DefaultTemplate(tokenizer.bos_id, tokenizer.eos_id))
    assert tokenizer.decode(example.ids.tolist()) == (
        "<|bos|>System: Be brief.\nUser: What is 2+2?\nAssistant: 4, of course.<|eos|>"
        "User: And 3+3?\nAssistant: 6.<|eos|>")
    assert labelled_runs(tokenizer, example) == ["4, of course.<|eos|>", "6.<|eos|>"]
    enc, bos, eos = tokenizer.encode, tokenizer.bos_id, tokenizer.eos_id
    pieces = [([bos], 0), (enc("System: Be brief.\nUser: What is 2+2?\nAssistant: "), 0), (enc("4, of course."), 1),
              ([eos], 1), (enc("User: And 3+3?\nAssistant: "), 0), (enc("6."), 1), ([eos], 1)]
    expected = [(t, m) for ids, m in pieces for t in ids]
    assert list(zip(example.ids.tolist(), example.mask.tolist())) == expected  # token by token
    eos_at = [i for i, t in enumerate(example.ids.tolist()) if t == eos]
    assert len(eos_at) == 2 and all(example.mask[i] == 1 for i in eos_at) and example.mask[0] == 0
    # exact match generates from the prompt of the last turn and compares with its content
    assert tokenizer.decode(example.ids[:example.prompt_tokens].tolist()).endswith("And 3+3?\nAssistant: ")
    assert example.answer == "6." and example.mask[example.prompt_tokens] == 1


def test_pieces_are_encoded_apart_so_no_token_crosses_the_boundary(tokenizer):
    joint = tokenizer.encode("User: what is it?\nAssistant: It is here.")
    [example] = tokenize_conversations([record_messages({"prompt": "what is it?", "response": "It is here."}, "x")],
                                       tokenizer, DefaultTemplate(tokenizer.bos_id, tokenizer.eos_id))
    assert joint != example.ids[1:-1].tolist()  # this tokenizer does merge across "Assistant: " + response
    assert labelled_runs(tokenizer, example) == ["It is here.<|eos|>"]


def test_prompt_response_renders_as_the_messages_form(tokenizer):
    template = DefaultTemplate(tokenizer.bos_id, tokenizer.eos_id)
    pair = record_messages({"prompt": "Name a colour.", "response": "Blue.", "id": 7}, "a.jsonl line 1")
    chat = record_messages({"messages": [{"role": "user", "content": "Name a colour."},
                                         {"role": "assistant", "content": "Blue."}]}, "a.jsonl line 2")
    a, b = tokenize_conversations([pair, chat], tokenizer, template)
    assert a.ids.tolist() == b.ids.tolist() and a.mask.tolist() == b.mask.tolist()
    assert (a.prompt_tokens, a.answer) == (b.prompt_tokens, b.answer)
    assert tokenizer.decode(a.ids.tolist()) == "<|bos|>User: Name a colour.\nAssistant: Blue.<|eos|>"


@pytest.mark.parametrize("record, message", [
    ([1, 2], "must be a JSON object"),
    ({"text": "x"}, 'neither "prompt"/"response" nor "messages"'),
    ({"prompt": "x"}, 'no "response"'),
    ({"prompt": "x", "response": " \n"}, "the response is empty"),
    ({"prompt": "x", "response": 3}, '"response" is a int'),
    ({"messages": [{"role": "user", "content": "x"}]}, "not the assistant's"),
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "role 'bot'"),
    ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}, "content of type list"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "assistant", "content": "y"}], "prompt": "x"}, "keep one form"),
])
def test_bad_records_name_the_place(record, message):
    with pytest.raises(DataError, match=message) as err:
        record_messages(record, "a.jsonl line 7")
    assert str(err.value).startswith("a.jsonl line 7: ") and "\n" not in str(err.value)


def test_long_examples_are_cut_and_long_prompts_refused(tokenizer):
    [example] = tokenize_conversations([CHAT], tokenizer, DefaultTemplate(tokenizer.bos_id, tokenizer.eos_id))
    cut, was_cut = fit_to_length(example, example.prompt_tokens + 1, "a.jsonl line 3")
    assert was_cut and cut.ids.size == example.prompt_tokens + 2 and cut.mask.size == cut.ids.size
    assert cut.ids.tolist() == example.ids[:cut.ids.size].tolist() and cut.mask[-2:].tolist() == [1, 1]
    same, was_cut = fit_to_length(example, example.ids.size - 1, "a.jsonl line 3")
    assert not was_cut and same is example
    with pytest.raises(DataError, match=rf"a.jsonl line 3: the prompt is {example.prompt_tokens} tokens, --seq-len "
                                        rf"{example.prompt_tokens} leaves no room for the response"):
        fit_to_length(example, example.prompt_tokens, "a.jsonl line 3")


# -- chat_template ---------------------------------------------------------------------------------

TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] == 'assistant' %}<A> {{ m['content'] }}{{ eos_token }}\n"
            "{% else %}<{{ m['role'] }}> {{ m['content'] }}\n{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}<A> {% endif %}")


def test_chat_template_mask_is_found_by_prefix_rendering(tokenizer, tmp_path):
    tok = template_tokenizer(tokenizer, tmp_path / "tok", TEMPLATE)
    template = choose_template(tok, "auto")
    assert isinstance(template, ChatTemplate) and isinstance(choose_template(tok, "default"), DefaultTemplate)
    [example] = tokenize_conversations([CHAT], tok, template)
    assert tok.decode(example.ids.tolist()) == ("<|bos|><system> Be brief.\n<user> What is 2+2?\n<A> 4, of course."
                                                "<|eos|>\n<user> And 3+3?\n<A> 6.<|eos|>\n")
    assert labelled_runs(tok, example) == ["4, of course.<|eos|>\n", "6.<|eos|>\n"]
    assert tok.decode(example.ids[:example.prompt_tokens].tolist()).endswith("<user> And 3+3?\n<A> ")
    assert example.answer == "6."


@pytest.mark.parametrize("source, message", [
    ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}Reply: {% endif %}",
     r"does not render message 1 \(assistant\) as a continuation"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),  # the sandbox holds
    ("{% set x = messages.append(1) %}", "SecurityError"),  # immutable: a template cannot change its input
    ("{{ raise_exception('only user/assistant') }}", "only user/assistant"),
    ("{% for m in messages %}", "not a valid jinja template"),
])
def test_a_bad_chat_template_is_one_line_naming_it(tokenizer, tmp_path, source, message):
    tok = template_tokenizer(tokenizer, tmp_path / "tok", source)
    with pytest.raises(DataError, match=message) as err:
        tokenize_conversations([CHAT[1:3]], tok, choose_template(tok, "tokenizer"), ["a.jsonl line 4"])
    assert "chat_template of" in str(err.value) and "tokenizer_config.json" in str(err.value)
    assert "\n" not in str(err.value)


def test_template_tokenizer_requires_a_chat_template(tokenizer):
    with pytest.raises(DataError, match="has no chat_template; add one or pass --template default"):
        choose_template(tokenizer, "tokenizer")
    assert isinstance(choose_template(tokenizer, "auto"), DefaultTemplate)


# -- the prepared folder ---------------------------------------------------------------------------

SEQ = 96  # room for CHAT's prompt (about 70 tokens with this small vocabulary), not for the long record


def records(n=40):
    out = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(n)]
    return out + [{"messages": CHAT}, {"prompt": "Say a long thing.", "response": "word " * 120}]


@pytest.fixture(scope="module")
def folder(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    source = write_jsonl(root / "a.jsonl", records())
    val = write_jsonl(root / "v.jsonl", records(3)[:3])
    prepare_sft([source], folder_of(tokenizer), root / "out", seq_len=SEQ, val_inputs=[val], shard_bytes=8 << 10,
                progress=False)
    return root / "out"


def test_the_folder_reads_back_what_was_tokenized(folder, tokenizer):
    manifest = read_manifest(folder)
    assert is_sft_folder(folder) and manifest["seq_len"] == SEQ and manifest["template"] == "default"
    train = load_sft_split(folder, "train")
    expected = tokenize_conversations([record_messages(r, "") for r in records()], tokenizer,
                                      DefaultTemplate(tokenizer.bos_id, tokenizer.eos_id))
    assert len(train) == len(expected) == manifest["splits"]["train"]["documents"]
    assert len(manifest["splits"]["train"]["shards"]) > 1
    for i, want in enumerate(expected):
        want, _ = fit_to_length(want, SEQ, "")
        assert train.ids(i).tolist() == want.ids.tolist() and train.loss_mask(i).tolist() == want.mask.tolist()
        assert (train.prompt_tokens[i], train.answers[i]) == (want.prompt_tokens, want.answer)
    long = train.ids(len(train) - 1)
    assert long.size == SEQ + 1 and manifest["splits"]["train"]["truncated"] == 1
    assert manifest["splits"]["train"]["labelled_tokens"] == int(train.mask.sum())
    assert len(load_sft_split(folder, "val")) == 3
    prompt, answer = answer_examples(train, 2)[1]
    assert tokenizer.decode(prompt) == "<|bos|>User: What is 1 plus 1?\nAssistant: " and answer == "It is 2."
    # the pretraining reader still reads these shards (it skips the mask)
    shard = folder / manifest["splits"]["train"]["shards"][0]["name"]
    assert read_shard(str(shard), 400)[0].tolist() == train.ids(0).tolist()


def test_the_same_input_gives_byte_identical_folders(folder, tokenizer, tmp_path):
    again = tmp_path / "again"
    prepare_sft([str(folder.parent / "a.jsonl")], folder_of(tokenizer), again, seq_len=SEQ,
                val_inputs=[str(folder.parent / "v.jsonl")], shard_bytes=8 << 10, progress=False)
    for path in folder.iterdir():
        if path.is_file():
            assert (again / path.name).read_bytes() == path.read_bytes(), path.name


def test_val_fraction_is_deterministic_and_keeps_duplicates_together(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", records(60) + records(60))
    prepare_sft([source], folder_of(tokenizer), tmp_path / "out", seq_len=SEQ, val_fraction=0.3, seed=3, progress=False)
    train, val = load_sft_split(tmp_path / "out", "train"), load_sft_split(tmp_path / "out", "val")
    assert 0 < len(val) < len(train) and len(train) + len(val) == 124
    assert not set(train.answers) & set(val.answers)


def _rewrite_member(folder, suffix, edit):
    """Rewrite member KEY.{suffix} of the first example of train's first shard, and the manifest's
    sha256 and size to match: only the content checks can catch it."""
    manifest = json.loads((folder / MANIFEST).read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    shard = folder / entry["name"]
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            if name == f"0000000000.{suffix}":
                payload = edit(payload)
                if payload is None:
                    continue
            _tar_member(tar, name, payload)
    shard.write_bytes(buffer.getvalue())
    entry.update(sha256=file_sha256(shard), bytes=shard.stat().st_size)
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("suffix, edit, message", [
    ("mask.npy", lambda p: npy_bytes(np.full(np.load(io.BytesIO(p)).size, 2, np.uint8)), "values other than 0 and 1"),
    ("mask.npy", lambda p: npy_bytes(np.ones(3, np.uint8)), "its mask has shape"),
    ("mask.npy", lambda p: None, "has no .mask.npy member"),
    ("json", lambda p: json.dumps({**json.loads(p), "prompt_tokens": 999}).encode(), "prompt_tokens 999"),
    ("json", lambda p: json.dumps({**json.loads(p), "answer": None}).encode(), "string answer"),
    ("npy", lambda p: npy_bytes(np.array([5, 6], np.uint16)), "its mask has shape"),
    ("npy", lambda p: npy_bytes(np.full(np.load(io.BytesIO(p)).size, 4000, np.uint16)), "token id 4000"),
])
def test_damaged_examples_are_one_error_naming_shard_and_key(folder, tmp_path, suffix, edit, message):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    _rewrite_member(copy, suffix, edit)
    with pytest.raises(DataError, match=message) as err:
        load_sft_split(copy, "train")
    assert "train-000000.tar" in str(err.value) and "\n" not in str(err.value)


def test_a_changed_shard_or_a_pretraining_folder_is_refused(folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    shard = copy / "train-000000.tar"
    raw = bytearray(shard.read_bytes())
    raw[raw.index(b"\x93NUMPY") + 130] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="not what its manifest lists"):
        load_sft_split(copy, "train")
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["kind"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert not is_sft_folder(copy)
    with pytest.raises(DataError, match="not a fine-tuning folder"):
        load_sft_split(copy, "train")
    (copy / MANIFEST).write_text(json.dumps({**manifest, "kind": "rlhf", "seq_len": 8}))
    with pytest.raises(DataError, match="kind 'rlhf' is not one of"):
        read_manifest(copy)


# -- batches ---------------------------------------------------------------------------------------

def synthetic_examples(n=23, seq_len=12, seed=0):
    """n examples whose first token is their index + 10 (to recognise them in a batch)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(3, seq_len + 2))
        ids = np.concatenate([[i + 10], rng.integers(40, 90, size=length - 1)]).astype(np.uint16)
        prompt = int(rng.integers(1, length))
        mask = (np.arange(length) >= prompt).astype(np.uint8)
        rows.append((ids, mask, prompt, f"answer {i}"))
    return SFTExamples.build(rows, seq_len, 100)


def batches(examples, steps, micro_batch, dp_size, grad_accum, seed=5, state=None, shuffle=True):
    """The examples each optimizer step sees, as a sorted list, over all DP ranks."""
    loaders = [SFTBatches(examples, 12, 0, micro_batch, grad_accum, r, dp_size, seed, shuffle) for r in range(dp_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    its = [iter(loader) for loader in loaders]
    out = []
    for _ in range(steps):
        seen = [int(x) - 10 for it in its for _ in range(grad_accum) for x in next(it)[0][:, 0]]
        out.append(sorted(seen))
    return out, loaders


def test_labels_shift_by_one_with_ignore_on_prompt_and_padding():
    examples = SFTExamples.build([(np.array([1, 10, 11, 12, 13, 2], np.uint16), np.array([0, 0, 0, 1, 1, 1], np.uint8),
                                   3, "x")], 8, 20)
    inputs, labels = next(iter(SFTBatches(examples, 8, 0, 1, 1, 0, 1, 0)))
    assert inputs.dtype == labels.dtype == torch.int64
    assert inputs.tolist() == [[1, 10, 11, 12, 13, 0, 0, 0]]
    assert labels.tolist() == [[-100, -100, 12, 13, 2, -100, -100, -100]]


def test_every_epoch_is_a_permutation_and_shuffle_false_is_file_order():
    examples = synthetic_examples()
    steps, _ = batches(examples, 46, 1, 1, 1)  # two epochs
    flat = [g for [g] in steps]
    assert sorted(flat[:23]) == sorted(flat[23:]) == list(range(23))
    assert list(epoch_order(23, 5, 0)) != list(epoch_order(23, 5, 1))
    ordered, _ = batches(examples, 5, 3, 1, 1, shuffle=False)
    assert ordered[:2] == [[0, 1, 2], [3, 4, 5]]


def test_global_batches_do_not_depend_on_the_dp_split():
    examples = synthetic_examples()
    two_ranks, _ = batches(examples, 20, 2, 2, 1)
    one_rank, _ = batches(examples, 20, 4, 1, 1)
    accumulated, _ = batches(examples, 20, 1, 2, 2)
    assert two_ranks == one_rank == accumulated
    assert all(len(step) == 4 for step in two_ranks)
    counts = collections.Counter(g for step in one_rank for g in step)
    assert set(counts) == set(range(23))  # 80 examples over 3+ epochs: all of them, none lost


def test_resume_continues_identically():
    examples = synthetic_examples()
    loader = SFTBatches(examples, 12, 0, 2, 3, 1, 2, 7)
    it = iter(loader)
    for _ in range(7):
        next(it)
    state = loader.state_dict()
    assert state == {"examples_before": 0, "position": 7, "global_batch": 12, "grad_accum": 3}
    fresh = SFTBatches(examples, 12, 0, 2, 3, 1, 2, 7)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # a checkpoint stores it as JSON or similar
    for a, b in zip(range(10), zip(it, iter(fresh))):
        (x1, y1), (x2, y2) = b
        assert x1.equal(x2) and y1.equal(y2)


@pytest.mark.parametrize("layout", [(4, 1, 1), (1, 2, 2), (2, 1, 2), (1, 4, 1)])
def test_redeal_continues_with_the_same_examples_at_another_layout(layout):
    examples = synthetic_examples()
    old, loaders = batches(examples, 20, 2, 2, 1)  # what the old layout would see in steps 0..19
    _, first = batches(examples, 6, 2, 2, 1)
    states = [loader.state_dict() for loader in first]
    new_state = redeal_sft_state(states, 6)
    assert new_state["examples_before"] == 24 and new_state["position"] == 0
    micro_batch, dp_size, grad_accum = layout
    continued, _ = batches(examples, 14, micro_batch, dp_size, grad_accum, state=new_state)
    assert continued == old[6:]
    # and once more: a redealt state, saved and redealt again, still continues exactly
    _, mid = batches(examples, 4, micro_batch, dp_size, grad_accum, state=new_state)
    again = redeal_sft_state([loader.state_dict() for loader in mid], 10)
    rest, _ = batches(examples, 10, 2, 2, 1, state=again)
    assert rest == old[10:]


GOOD = {"examples_before": 4, "position": 3, "global_batch": 4, "grad_accum": 1}


@pytest.mark.parametrize("state", [
    None, [], {}, {**GOOD, "extra": 1}, {k: v for k, v in GOOD.items() if k != "position"},
    {**GOOD, "position": -1}, {**GOOD, "position": True}, {**GOOD, "position": 1.0}, {**GOOD, "position": "3"},
    {**GOOD, "examples_before": 2 ** 70}, {**GOOD, "global_batch": 0}, {**GOOD, "grad_accum": None},
])
def test_damaged_states_are_refused(state):
    loader = SFTBatches(synthetic_examples(), 12, 0, 2, 1, 0, 2, 0)
    loader.load_state_dict(GOOD)  # the good one loads
    with pytest.raises(DataError, match="fine-tuning data state in the checkpoint is damaged"):
        loader.load_state_dict(state)
    with pytest.raises(DataError, match="damaged"):
        redeal_sft_state([state], 5)


def test_layout_and_redeal_mismatches_are_refused():
    loader = SFTBatches(synthetic_examples(), 12, 0, 2, 1, 0, 2, 0)
    with pytest.raises(DataError, match="global batch of 8 in 2 micro-steps, this run has 4 in 1"):
        loader.load_state_dict({**GOOD, "global_batch": 8, "grad_accum": 2, "position": 2})
    loader.load_state_dict({**GOOD, "global_batch": 8, "grad_accum": 2, "position": 0})  # nothing to re-count
    with pytest.raises(DataError, match="disagree"):
        redeal_sft_state([GOOD, {**GOOD, "position": 4}], 5)
    # A replaced (non-finite) micro-batch leaves the position mid-step: every example taken counts.
    mid_step = redeal_sft_state([{**GOOD, "examples_before": 0, "grad_accum": 2, "global_batch": 8}], 1)
    assert mid_step["examples_before"] == 3 * 4 and mid_step["position"] == 0
    with pytest.raises(DataError, match="fewer than the checkpoint's step 4 needs"):
        redeal_sft_state([{**GOOD, "examples_before": 0}], 4)
    with pytest.raises(DataError, match="no fine-tuning data state"):
        redeal_sft_state([], 2)


def test_examples_longer_than_the_run_seq_len_are_refused():
    examples = synthetic_examples(seq_len=12)
    with pytest.raises(DataError, match="prepared with --seq-len 12, longer than data.seq_len=8; set data.seq_len >= 12"):
        SFTBatches(examples, 8, 0, 1, 1, 0, 1, 0)
    with pytest.raises(DataError, match="data.seq_len=8"):
        validation_batches_sft(examples, 8, 0, 2, 3)
    with pytest.raises(DataError, match="not 2 to seq_len"):
        SFTExamples.build([(np.arange(20) % 10, np.ones(20, np.uint8), 1, "x")], 12, 100)


def test_validation_batches_are_file_order_and_wrap():
    examples = synthetic_examples(n=5)
    held_out = validation_batches_sft(examples, 12, 0, 2, 4)
    assert [[int(x) - 10 for x in inputs[:, 0]] for inputs, _ in held_out] == [[0, 1], [2, 3], [4, 0], [1, 2]]
    assert validation_batches_sft(examples, 12, 0, 2, 4)[3][1].equal(held_out[3][1])
    assert [a for _, a in answer_examples(examples, 9)] == [f"answer {i}" for i in range(5)]
    empty = SFTExamples.build([], 12, 100)
    assert validation_batches_sft(empty, 12, 0, 2, 0) == [] and answer_examples(empty, 3) == []
    with pytest.raises(DataError, match="the validation split holds no examples; prepare the folder with --val-input"):
        validation_batches_sft(empty, 12, 0, 2, 1)
