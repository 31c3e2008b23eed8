"""schedule_info: what a Proxmox calendar event means (policy/calendar does the work)."""
from __future__ import annotations

from dataclasses import dataclass

from ..policy.calendar import describe_schedule
from .request import Request


@dataclass
class ScheduleInfoRequest(Request):
    schedule: str
    start_time: str = None       # None: now
    iterations: int = 10
    timezone: str = None         # None: the node's


def run_schedule_info(request):
    """The normalized event, its next times and its ``OnCalendar=`` lines; reads nothing."""
    return describe_schedule(request.schedule, request.start_time, request.iterations,
                             request.timezone)
