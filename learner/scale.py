"""`python -m learner.scale`: the command, kept where users run it; the code is `controller.scale`."""

from controller.scale import main

if __name__ == "__main__":
    raise SystemExit(main())
