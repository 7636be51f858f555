"""Run the named tests with unittest and print how many passed, failed
and were skipped.

The tests are counted one by one as they end, because the "Ran N tests"
line of Python 3.12.1 leaves out skipped tests, and log lines written
during a test can split the verbose "... ok" lines. It runs on every
Python from 3.6 on.
"""

import os
import sys
import unittest


class CountingResult(unittest.TextTestResult):
    """A verbose text result that also counts the tests that passed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passed = 0

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed += 1


def main():
    # "python -m unittest" finds test modules in the current folder.
    sys.path.insert(0, os.getcwd())
    runner = unittest.TextTestRunner(verbosity=2,
                                     resultclass=CountingResult)
    program = unittest.main(module=None, argv=["unittest"] + sys.argv[1:],
                            testRunner=runner, exit=False)
    result = program.result
    failed = (len(result.failures) + len(result.errors)
              + len(result.unexpectedSuccesses))
    print("counts: %d passed, %d failed, %d skipped"
          % (result.passed, failed, len(result.skipped)))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
