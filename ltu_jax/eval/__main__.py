import sys

from ltu_jax.eval.run import main

sys.exit(main())
