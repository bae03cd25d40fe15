"""Stands for someone else's code: importing it must not happen unless the user allowed the folder."""

raise RuntimeError("suite plugin code ran although the folder was not allowed")
