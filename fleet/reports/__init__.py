"""Usage and health reports from the fleet's own store (no InfluxDB needed).

Computation (`period`, `timeline`, `usage`) is kept apart from rendering (`render`, `charts`):
`usage_report()` returns plain figures; renderers only format them. The rules each figure
follows are stated in the headers of `timeline` and `usage`.
"""

from fleet.reports.period import Period, ReportError, month_period
from fleet.reports.usage import UsageReport, usage_report

__all__ = ["Period", "ReportError", "UsageReport", "month_period", "usage_report"]
