import pytest

from tests.parallel.training import SMALL_GPT2_4_BLOCKS, SMALL_LLAMA, SMALL_MODEL, save_init_weights


@pytest.fixture(scope="session")
def init_weights(tmp_path_factory):
    return save_init_weights(tmp_path_factory.mktemp("init") / "gpt2.safetensors", SMALL_MODEL)


@pytest.fixture(scope="session")
def init_weights_4_blocks(tmp_path_factory):
    return save_init_weights(tmp_path_factory.mktemp("init") / "gpt2_4_blocks.safetensors", SMALL_GPT2_4_BLOCKS)


@pytest.fixture(scope="session")
def init_weights_llama(tmp_path_factory):
    return save_init_weights(tmp_path_factory.mktemp("init") / "llama.safetensors", SMALL_LLAMA)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """A small real-text corpus (Python's own pydoc topics) with a 512-token tokenizer."""
    from gptscale.data.prepare import prepare
    from gptscale.data.sources import embedded_documents
    from gptscale.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("data")
    train_tokenizer([text for _, text in embedded_documents("pydoc")], 512, root / "tok")
    prepare(["builtin:pydoc"], str(root / "tok"), root / "shards", shard_bytes=48 << 10, val_fraction=0.05,
            workers=1, progress=False)
    return root / "shards"
