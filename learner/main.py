"""`python -m learner.main` (as in `ray job submit -- python -m learner.main`): the driver's entry point,
kept where users run it; the driver itself is `controller.driver`."""

from controller.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
