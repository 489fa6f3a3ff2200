"""Test infrastructure: real mosquitto brokers, a paho observer and a fault-injecting proxy."""
