{{/* The chart name, at most 63 characters. */}}
{{- define "cotune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: "<release>-cotune" unless the release name holds it.
Short enough (40) that "<prefix>-workers-gN-<ordinal>" stays a valid pod name and label. */}}
{{- define "cotune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cotune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "cotune.labels" -}}
helm.sh/chart: {{ include "cotune.chart" . }}
{{ include "cotune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cotune
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "cotune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cotune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of the worker pods (all groups) and of the router pods. */}}
{{- define "cotune.workerSelectorLabels" -}}
{{ include "cotune.selectorLabels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "cotune.routerSelectorLabels" -}}
{{ include "cotune.selectorLabels" . }}
app.kubernetes.io/component: router
{{- end }}

{{/* Object names. */}}
{{- define "cotune.workersName" -}}{{ include "cotune.fullname" . }}-workers{{- end }}
{{- define "cotune.headlessName" -}}{{ include "cotune.fullname" . }}-workers-headless{{- end }}
{{- define "cotune.routerName" -}}{{ include "cotune.fullname" . }}-router{{- end }}
{{- define "cotune.configName" -}}{{ include "cotune.fullname" . }}-config{{- end }}

{{- define "cotune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cotune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cotune.adminSecretName" -}}
{{- default (printf "%s-admin" (include "cotune.fullname" .)) .Values.adminToken.existingSecret }}
{{- end }}

{{- define "cotune.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The worker StatefulSets: one named "<prefix>-workers" of workers.replicas pods, or with
workers.shardedBase one per group, "<prefix>-workers-g<N>" of workers.ranksPerGroup pods.
Returns a JSON list of {name, group, replicas}. */}}
{{- define "cotune.workerSets" -}}
{{- $w := .Values.workers }}
{{- $sets := list }}
{{- if $w.shardedBase }}
{{- if lt (int $w.ranksPerGroup) 2 }}
{{- fail "workers.shardedBase needs workers.ranksPerGroup of 2 or more" }}
{{- end }}
{{- if ne (mod (int $w.replicas) (int $w.ranksPerGroup)) 0 }}
{{- fail (printf "workers.replicas (%d) must be a multiple of workers.ranksPerGroup (%d) with workers.shardedBase: every group has ranksPerGroup ranks" (int $w.replicas) (int $w.ranksPerGroup)) }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- fail "autoscaling.enabled does not go with workers.shardedBase: a sharded group has a fixed size; scale by workers.replicas (whole groups)" }}
{{- end }}
{{- range $g := until (div (int $w.replicas) (int $w.ranksPerGroup) | int) }}
{{- $sets = append $sets (dict "name" (printf "%s-g%d" (include "cotune.workersName" $) $g) "group" $g "replicas" (int $w.ranksPerGroup)) }}
{{- end }}
{{- else }}
{{- if ne (int $w.ranksPerGroup) 1 }}
{{- fail "workers.ranksPerGroup above 1 needs workers.shardedBase: true" }}
{{- end }}
{{- $sets = append $sets (dict "name" (include "cotune.workersName" .) "group" 0 "replicas" (int $w.replicas)) }}
{{- end }}
{{- toJson $sets }}
{{- end }}

{{/* The probe of a container. With http.enabled: GET /health on the HTTP port, which answers
from the same grpc.health.v1 status as a gRPC probe and fails too when the HTTP front is down;
over HTTPS with TLS (the kubelet does not verify certificates), but not with client
certificates required: the kubelet presents none. Else the gRPC probe, or with TLS a TCP
probe (Kubernetes' gRPC probes speak plaintext only). Arguments: (dict "root" $ "probe"
<values>). */}}
{{- define "cotune.probe" -}}
{{- $v := .root.Values }}
{{- if and $v.http.enabled (not (and $v.tls.enabled $v.tls.clientCASecretName)) }}
httpGet:
  path: /health
  port: http
  scheme: {{ ternary "HTTPS" "HTTP" $v.tls.enabled }}
{{- else if $v.tls.enabled }}
tcpSocket:
  port: grpc
{{- else }}
grpc:
  port: {{ $v.ports.grpc }}
{{- end }}
periodSeconds: {{ .probe.periodSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
timeoutSeconds: {{ .probe.timeoutSeconds | default 3 }}
{{- end }}

{{/* The model volume's source. */}}
{{- define "cotune.modelVolume" -}}
{{- $v := .Values.model.volume }}
{{- if eq $v.type "persistentVolumeClaim" }}
{{- if not $v.claimName }}
{{- fail "model.volume.type persistentVolumeClaim needs model.volume.claimName" }}
{{- end }}
persistentVolumeClaim:
  claimName: {{ $v.claimName }}
  readOnly: true
{{- else if eq $v.type "hostPath" }}
{{- if not $v.hostPath }}
{{- fail "model.volume.type hostPath needs model.volume.hostPath" }}
{{- end }}
hostPath:
  path: {{ $v.hostPath }}
  type: Directory
{{- else }}
emptyDir: {}
{{- end }}
{{- end }}

{{/* The external mode: one PostgreSQL registry (registry.existingSecret) and one S3 store
(blobs.url) for every worker, "true"; or the embedded mode, "". Half of it is refused: a
shared registry over blobs on each worker's volume would list versions that only their
publisher can read, and registries of their own over one bucket would each sweep the versions
of the others as blobs no row references. */}}
{{- define "cotune.external" -}}
{{- $r := .Values.registry }}
{{- $b := .Values.blobs }}
{{- if and $r.existingSecret (not $b.url) }}
{{- fail "registry.existingSecret needs blobs.url: workers sharing one registry with adapter versions on their own data volumes would list versions that only the worker that published them can read; set blobs.url (an s3:// store they share) too, or neither for the embedded mode" }}
{{- end }}
{{- if and $b.url (not $r.existingSecret) }}
{{- fail "blobs.url needs registry.existingSecret: workers with registries of their own over one bucket would each sweep the versions of the others as blobs no row references; set registry.existingSecret (a PostgreSQL registry they share) too, or neither for the embedded mode" }}
{{- end }}
{{- if and (not $b.url) (or $b.endpoint $b.region $b.existingSecret $r.passwordKey) }}
{{- fail "blobs.endpoint, blobs.region, blobs.existingSecret and registry.passwordKey are settings of the external mode, which registry.existingSecret and blobs.url turn on: set those too, or leave these empty for the embedded mode" }}
{{- end }}
{{- if $r.existingSecret }}
{{- if .Values.workers.persistence.sharedClaim }}
{{- fail "workers.persistence.sharedClaim does not go with the external mode (registry.existingSecret, blobs.url): the workers share the registry and the store already, and their data volumes hold what is each worker's own (the blob cache, training states, uploads being received); leave sharedClaim empty: each worker gets a ReadWriteOnce claim and may run on any node" }}
{{- end }}
{{- if .Values.workers.shardedBase }}
{{- fail "registry.existingSecret does not go with workers.shardedBase yet: each rank of a sharded base keeps a registry of its own in DATA_DIR/rank-N (cotune serve refuses --registry under a sharded base); leave registry and blobs empty" }}
{{- end }}
{{- print "true" }}
{{- end }}
{{- end }}
