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
