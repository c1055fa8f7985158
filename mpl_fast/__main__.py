import sys

from mpl_fast.train import main

sys.exit(main())
