"""`python train.py [group=choice ...] [key=value ...]` in a checkout: the same as the console script
`lightning-peft-train`. The app is the package `lightning_peft.app` (configs: lightning_peft/app/configs/)."""

from lightning_peft.app import main

if __name__ == "__main__":
    main()
