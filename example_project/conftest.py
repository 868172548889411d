"""Shows how many turns the paid model was called for (zero in a replay)."""

import support_agent


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"paid model calls: {len(support_agent.PAID_CALLS)}")
