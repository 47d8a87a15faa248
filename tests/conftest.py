"""Fixtures every test folder shares."""
import pytest


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
