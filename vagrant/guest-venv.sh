#!/bin/sh
# The venv a Vagrant guest uses: the one a tether/ box ships (vagrant/box/build.sh)
# if there is one, else /tether/.venv (made by provision.sh).
if [ -x /opt/tether-venv/bin/python ]; then echo /opt/tether-venv; else echo /tether/.venv; fi
