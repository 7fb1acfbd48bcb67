"""`python -m learner.merge`: the command, kept where users run it; the code is `controller.merge`."""

from controller.merge import main

if __name__ == "__main__":
    raise SystemExit(main())
