"""A third-party prediction listener: prints each prediction's camera, frame, best label and its
confidence, in plain paho-mqtt and json.

docs/protocol.md, "Predictions out": `edgefleet/<device>/predictions/+` carries every camera's
predictions as JSON, `top` best first. Usage: python examples/paho_listener.py --device device-1
"""

import argparse
import json

import paho.mqtt.subscribe as subscribe

parser = argparse.ArgumentParser(description="Print the predictions of an edgefleet device.")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=1883)
parser.add_argument("--device", default="device-1")
args = parser.parse_args()


def show(client, userdata, message):
    prediction = json.loads(message.payload)
    best = prediction["top"][0]
    print(f"{prediction['camera']} {prediction['frame_id']}: {best['label']} {best['score']:.3f}", flush=True)


subscribe.callback(show, f"edgefleet/{args.device}/predictions/+", qos=1, hostname=args.host, port=args.port)
