#!/usr/bin/python3
"""A stand-in for systemd-timedated on a private D-Bus: the name
org.freedesktop.timedate1 with the properties `timedatectl show` reads.

    timedate1_mock.py BUS_ADDRESS yes|no

NTPSynchronized is the second argument. Prints "ready" once the name is owned.
Needs /usr/bin/python3 with python3-dbus and python3-gi (scripts/install-test-deps).
"""
import sys
import time

import dbus
import dbus.mainloop.glib
import dbus.service
from gi.repository import GLib

IFACE = "org.freedesktop.timedate1"


class TimeDate(dbus.service.Object):
    def __init__(self, bus, synchronized):
        super().__init__(bus, "/org/freedesktop/timedate1")
        self.props = {
            "Timezone": dbus.String("UTC"),
            "LocalRTC": dbus.Boolean(False),
            "CanNTP": dbus.Boolean(True),
            "NTP": dbus.Boolean(True),
            "NTPSynchronized": dbus.Boolean(synchronized),
            "TimeUSec": dbus.UInt64(0),
            "RTCTimeUSec": dbus.UInt64(0),
        }

    @dbus.service.method(dbus.PROPERTIES_IFACE, in_signature="ss", out_signature="v")
    def Get(self, interface, name):
        if interface != IFACE or name not in self.props:
            raise dbus.exceptions.DBusException(
                "org.freedesktop.DBus.Error.UnknownProperty", name)
        return self.props[name]

    @dbus.service.method(dbus.PROPERTIES_IFACE, in_signature="s", out_signature="a{sv}")
    def GetAll(self, interface):
        if interface != IFACE:
            return dbus.Dictionary({}, signature="sv")
        return dbus.Dictionary(self.props, signature="sv")


def main():
    address, synchronized = sys.argv[1], sys.argv[2] == "yes"
    dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
    for attempt in range(100):
        try:
            bus = dbus.bus.BusConnection(address)
            break
        except dbus.exceptions.DBusException:
            if attempt == 99:
                raise
            time.sleep(0.1)
    name = dbus.service.BusName(IFACE, bus)
    service = TimeDate(bus, synchronized)
    print("ready", flush=True)
    GLib.MainLoop().run()
    del name, service


if __name__ == "__main__":
    main()
