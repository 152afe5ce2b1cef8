{{/*
Least-privilege NATS permissions, one set per identity (DESIGN.md §5). Everything not
allowed here is denied. Each helper returns a JSON object
{"publish": [...], "subscribe": [...], "allow_responses": bool}; auth.conf is built from them.

These are the sets of services/mesh/identities.py, the one source of the identity model
(`attestmesh up` configures its embedded server from it); tests/test_deploy.py fails when
the two differ, so change both together.

Building blocks:
- a durable pull consumer D on stream S filtered to F: look it up, create it only with
  that filter (the filter is part of the create subject, so a verifier cannot widen it
  to another family), pull from it, and ack its messages;
- a KV bucket B: read (stream info, message get), write ($KV.B.>), and watch (an ordered
  consumer with flow control);
- dead letters: each consumer may publish only to attest.dlq.<its own stream>;
- replies: each identity receives replies only below its own inbox prefix, _INBOX_<identity>
  for services and the admin, _INBOX_node_<node> for a node (so nobody else can read the
  nonces and wrapped secrets answered to it); responders answer via allow_responses.
*/}}

{{- define "attestmesh.nats.streamNames" -}}
{{- toJson (list "EVIDENCE" "VERDICTS" "DECISIONS" "DLQ" "KV_nonces" "KV_refvalues" "KV_policies" "KV_collateral" "KV_broker-state" "KV_node-pins" "KV_appraisals") -}}
{{- end -}}

{{/*
Stream and bucket declaration. The services declare every stream and bucket at start-up
(Bus.setup); creating one that does not exist is all they may do. No identity may change an
existing stream's configuration (shortening a bucket's max age would silently expire hardware
pins or the audit log): that is an out-of-band step with the server's own credentials.
*/}}
{{- define "attestmesh.nats.declare" -}}
{{- $out := list -}}
{{- range $stream := include "attestmesh.nats.streamNames" .root | fromJsonArray -}}
{{- $out = append $out (printf "$JS.API.STREAM.CREATE.%s" $stream) -}}
{{- if $.update -}}
{{- $out = append $out (printf "$JS.API.STREAM.UPDATE.%s" $stream) -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{- define "attestmesh.nats.consumer" -}}
{{- toJson (list
  (printf "$JS.API.CONSUMER.INFO.%s.%s" .stream .durable)
  (printf "$JS.API.CONSUMER.CREATE.%s.%s.%s" .stream .durable .filter)
  (printf "$JS.API.CONSUMER.MSG.NEXT.%s.%s" .stream .durable)
  (printf "$JS.ACK.%s.%s.>" .stream .durable)
) -}}
{{- end -}}

{{- define "attestmesh.nats.kvRead" -}}
{{- toJson (list
  (printf "$JS.API.STREAM.INFO.KV_%s" .)
  (printf "$JS.API.STREAM.MSG.GET.KV_%s" .)
) -}}
{{- end -}}

{{- define "attestmesh.nats.kvWatch" -}}
{{- toJson (list
  (printf "$JS.API.CONSUMER.CREATE.KV_%s" .)
  (printf "$JS.API.CONSUMER.INFO.KV_%s.*" .)
  (printf "$JS.FC.KV_%s.>" .)
) -}}
{{- end -}}

{{- define "attestmesh.nats.kvWrite" -}}
{{- toJson (list (printf "$KV.%s.>" .)) -}}
{{- end -}}

{{/* identity -> permissions; .root is the chart context, .identity the identity name. */}}
{{- define "attestmesh.nats.permissions" -}}
{{- $root := .root -}}
{{- $id := .identity -}}
{{- $declare := list -}}
{{- if $root.Values.nats.servicesDeclareStreams -}}
{{- $declare = include "attestmesh.nats.declare" (dict "root" $root "update" false) | fromJsonArray -}}
{{- end -}}
{{- $pub := list -}}
{{- $sub := list (printf "_INBOX_%s.>" $id) -}}
{{- $responder := false -}}
{{- if hasPrefix "verifier-" $id -}}
{{- $family := trimPrefix "verifier-" $id -}}
{{- $pub = concat $declare
  (include "attestmesh.nats.consumer" (dict "stream" "EVIDENCE" "durable" $id "filter" (printf "attest.evidence.%s.*" $family)) | fromJsonArray)
  (include "attestmesh.nats.kvRead" "collateral" | fromJsonArray)
  (include "attestmesh.nats.kvWrite" "collateral" | fromJsonArray)
  (include "attestmesh.nats.kvWatch" "collateral" | fromJsonArray)
  (list (printf "attest.verdict.%s.*" $family) "attest.dlq.EVIDENCE") -}}
{{- else if eq $id "policy" -}}
{{- $pub = concat $declare
  (include "attestmesh.nats.consumer" (dict "stream" "VERDICTS" "durable" "policy" "filter" "attest.verdict.>") | fromJsonArray)
  (include "attestmesh.nats.kvRead" "nonces" | fromJsonArray)
  (include "attestmesh.nats.kvWrite" "nonces" | fromJsonArray)
  (include "attestmesh.nats.kvRead" "policies" | fromJsonArray)
  (include "attestmesh.nats.kvWatch" "policies" | fromJsonArray)
  (include "attestmesh.nats.kvRead" "refvalues" | fromJsonArray)
  (include "attestmesh.nats.kvWatch" "refvalues" | fromJsonArray)
  (include "attestmesh.nats.kvRead" "node-pins" | fromJsonArray)
  (include "attestmesh.nats.kvWrite" "node-pins" | fromJsonArray)
  (include "attestmesh.nats.kvRead" "appraisals" | fromJsonArray)
  (include "attestmesh.nats.kvWrite" "appraisals" | fromJsonArray)
  (list "attest.decision.*" "attest.dlq.VERDICTS")
  (list "$JS.API.CONSUMER.LIST.EVIDENCE" "$JS.API.CONSUMER.LIST.VERDICTS" "$JS.API.CONSUMER.LIST.DECISIONS") -}}
{{- $sub = concat $sub (list "attest.nonce.* policy" "attest.load.*") -}}
{{- $responder = true -}}
{{- else if eq $id "broker" -}}
{{- $pub = concat $declare
  (include "attestmesh.nats.consumer" (dict "stream" "DECISIONS" "durable" "broker" "filter" "attest.decision.>") | fromJsonArray)
  (include "attestmesh.nats.kvRead" "broker-state" | fromJsonArray)
  (include "attestmesh.nats.kvWrite" "broker-state" | fromJsonArray)
  (include "attestmesh.nats.kvWatch" "broker-state" | fromJsonArray)
  (include "attestmesh.nats.kvRead" "node-pins" | fromJsonArray)
  (include "attestmesh.nats.kvWrite" "node-pins" | fromJsonArray)
  (include "attestmesh.nats.kvRead" "policies" | fromJsonArray)
  (include "attestmesh.nats.kvWatch" "policies" | fromJsonArray)
  (list "$JS.API.STREAM.PURGE.KV_broker-state" "attest.revoked.*" "attest.load.broker" "attest.dlq.DECISIONS") -}}
{{- $sub = concat $sub (list "attest.secret.* broker" "attest.operator.* broker") -}}
{{- $responder = true -}}
{{- else if hasPrefix "node-" $id -}}
{{- $node := trimPrefix "node-" $id -}}
{{- $pub = list (printf "attest.nonce.%s" $node) (printf "attest.evidence.*.%s" $node) (printf "attest.secret.%s" $node) -}}
{{- $sub = list (printf "_INBOX_node_%s.>" $node) (printf "attest.decision.%s" $node) (printf "attest.revoked.%s" $node) -}}
{{- else if eq $id "admin" -}}
{{- $pub = concat (include "attestmesh.nats.declare" (dict "root" $root "update" false) | fromJsonArray)
  (include "attestmesh.nats.kvRead" "collateral" | fromJsonArray)
  (include "attestmesh.nats.kvWrite" "collateral" | fromJsonArray)
  (include "attestmesh.nats.kvRead" "refvalues" | fromJsonArray)
  (include "attestmesh.nats.kvWrite" "refvalues" | fromJsonArray)
  (include "attestmesh.nats.kvWatch" "refvalues" | fromJsonArray)
  (include "attestmesh.nats.kvRead" "policies" | fromJsonArray)
  (include "attestmesh.nats.kvWrite" "policies" | fromJsonArray)
  (include "attestmesh.nats.kvWatch" "policies" | fromJsonArray)
  (include "attestmesh.nats.kvRead" "broker-state" | fromJsonArray)
  (include "attestmesh.nats.kvWatch" "broker-state" | fromJsonArray)
  (list "$KV.broker-state.keyring" "attest.operator.*")
  (list "$JS.API.CONSUMER.INFO.EVIDENCE.*" "$JS.API.CONSUMER.INFO.VERDICTS.*" "$JS.API.CONSUMER.INFO.DECISIONS.*") -}}
{{- $sub = concat $sub (list "attest.revoked.*" "attest.verdict.>" "attest.decision.>") -}}
{{- else -}}
{{- fail (printf "attestmesh: no NATS permissions defined for identity %q" $id) -}}
{{- end -}}
{{- toJson (dict "publish" (uniq $pub) "subscribe" (uniq $sub) "allow_responses" $responder) -}}
{{- end -}}
