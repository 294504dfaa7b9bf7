"""Linear-probe evaluation entry point.

Not implemented yet: the evaluator lands with issue #5. Until then this exits with
status 2 rather than pretending to evaluate.
"""

import sys

if __name__ == "__main__":
    sys.exit("eval.py: the evaluator is not implemented yet (issue #5); "
             "see README.md for what works today")
