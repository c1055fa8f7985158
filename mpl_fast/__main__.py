from mpl_fast.train import main
import sys
sys.exit(main())
