import pytest
from workflowrun import run_quickstart


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """The quickstart notebook's finished local workflow: (folder, executed notebook); its
    workspace is folder/ws. Session-wide: the object-store test compares against it."""
    work = tmp_path_factory.mktemp("quickstart")
    return work, run_quickstart(work)
