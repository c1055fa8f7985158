"""``python -m mpl_fast.label``: the offline labeller of reduced Meta Pseudo Labels
(mpl_fast.reduced.label)."""

import sys

from mpl_fast.reduced.label import main

if __name__ == "__main__":
    sys.exit(main())
