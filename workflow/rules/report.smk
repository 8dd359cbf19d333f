# Aggregation: run records -> tables, figures, claims ledger (filled in with the reporting stage).


def report_outputs():
    return []
