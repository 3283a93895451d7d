from tests.helpers.lab import lab_env, make_lab, pytest_runtest_makereport

__all__ = ["lab_env", "make_lab", "pytest_runtest_makereport"]
