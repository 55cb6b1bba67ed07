"""A third-party camera: one photo to an edgefleet device's frame topic, in plain paho-mqtt.

docs/protocol.md, "Frames in": the topic is `edgefleet/<device>/frames/<camera>` and the payload the
JPEG (or PNG) file's bytes as they are. Usage: python examples/paho_camera.py photo.jpg --device device-1
"""

import argparse

import paho.mqtt.publish as publish

parser = argparse.ArgumentParser(description="Publish one photo as a camera of an edgefleet device.")
parser.add_argument("photo", help="a JPEG or PNG file")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=1883)
parser.add_argument("--device", default="device-1")
parser.add_argument("--camera", default="door")
args = parser.parse_args()

with open(args.photo, "rb") as photo:
    frame = photo.read()
# QoS 1: single() returns once the broker has acknowledged the frame.
publish.single(f"edgefleet/{args.device}/frames/{args.camera}", frame, qos=1, hostname=args.host, port=args.port)
print(f"sent {args.photo} ({len(frame)} bytes) as camera {args.camera} of {args.device}")
