"""`python -m learner.export`: the command, kept where users run it; the code is `controller.export`."""

from controller.export import main

if __name__ == "__main__":
    raise SystemExit(main())
