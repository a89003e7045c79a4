import pytest


@pytest.fixture(scope="session")
def local_ray():
    """One real local Ray for the whole session (Ray starts in 5-10 s; tests share it). More
    logical CPUs than cores: a Tune trial, its Train workers and Ray Data's reads run together."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
