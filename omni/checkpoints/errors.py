"""The one error checkpoint resolution raises: its message is a single line saying what to do."""


class CheckpointError(Exception):
    pass
