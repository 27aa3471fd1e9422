"""Android phones over adb: list, profile, benchmark and run exported backbones on phones,
and an emulated device (``fedmobillm android emulate``) that speaks the adb device-side
transport on loopback so that all of it can be tried without a phone."""
