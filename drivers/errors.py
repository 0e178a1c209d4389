"""Errors shared by every driver: all of them derive from DriverError.

DeviceTimeout and DeviceUnreachable are about the link, not the protocol; each names the device's
address (e.g. "192.0.2.7:502", "[::1]:502", "/dev/ttyUSB0") in `address`.
"""


class DriverError(Exception):
    """Root of every error a driver raises."""


class DeviceLinkError(DriverError):
    """The device could not be talked to."""

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(address, detail)
        self.address = address
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.address}: {self.detail}"


class DeviceTimeout(DeviceLinkError):
    """The device did not answer in time."""


class DeviceUnreachable(DeviceLinkError):
    """The connection was refused, reset or closed by the device."""
