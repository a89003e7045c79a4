import pytest


@pytest.fixture(scope="session")
def local_ray():
    """One real local Ray for the whole session, started the way the CLI starts it (Ray starts
    in 5-10 s; tests share it). More logical CPUs than cores: a Tune trial, its Train workers and
    Ray Data's reads run together."""
    import ray

    from pipelines.runtime import init_ray

    init_ray(num_cpus=4, quiet=True)
    yield
    ray.shutdown()
