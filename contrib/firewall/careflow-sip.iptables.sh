#!/bin/sh
# iptables equivalent of careflow-sip.nft for hosts without nftables (needs the `recent` and
# `hashlimit` matches). Run as root; keep SSH open before applying.
set -e
IPT=${IPT:-iptables}

$IPT -N CAREFLOW_SIP 2>/dev/null || $IPT -F CAREFLOW_SIP
# Sources caught flooding stay dropped for 300 s.
$IPT -A CAREFLOW_SIP -m recent --name sip_flooders --rcheck --seconds 300 -j DROP
# More than 1000 new flows/s (burst 2000) per address: remember it and drop. Site-sized: one
# address may be a whole hospital behind NAT; careflow-sip limits each phone's flow itself.
$IPT -A CAREFLOW_SIP -m hashlimit --hashlimit-name sip --hashlimit-mode srcip \
     --hashlimit-above 1000/second --hashlimit-burst 2000 \
     -m recent --name sip_flooders --set -j DROP
$IPT -A CAREFLOW_SIP -j ACCEPT

$IPT -A INPUT -p udp --dport 5060 -m conntrack --ctstate ESTABLISHED -j ACCEPT
$IPT -A INPUT -p udp --dport 5060 -j CAREFLOW_SIP
$IPT -A INPUT -p tcp -m multiport --dports 5060,5061,8443 -m conntrack --ctstate NEW -j CAREFLOW_SIP
$IPT -A INPUT -p udp --dport 10000:60000 -j ACCEPT
