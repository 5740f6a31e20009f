{{/* Chart name, truncated to 63 characters. */}}
{{- define "gpuaas.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name: the release name, plus the chart name unless the release name already contains it.
Truncated to 52 characters so that suffixes such as "-webhook-tls" stay within 63.
*/}}
{{- define "gpuaas.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "gpuaas.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable across upgrades, so never add the version here. */}}
{{- define "gpuaas.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpuaas.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Standard labels of every object. */}}
{{- define "gpuaas.labels" -}}
helm.sh/chart: {{ include "gpuaas.chart" . }}
{{ include "gpuaas.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpuaas
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of the operator's objects (Deployment, pods, Services). */}}
{{- define "gpuaas.operator.labels" -}}
{{ include "gpuaas.labels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "gpuaas.operator.selectorLabels" -}}
{{ include "gpuaas.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "gpuaas.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "gpuaas.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "gpuaas.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* True ("true") when the operator runs in the cluster (the chart renders its Deployment). */}}
{{- define "gpuaas.inCluster" -}}
{{- if not .Values.operator.external -}}true{{- end -}}
{{- end -}}

{{- define "gpuaas.webhookServiceName" -}}
{{- printf "%s-webhook" (include "gpuaas.fullname" .) -}}
{{- end -}}

{{- define "gpuaas.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "gpuaas.fullname" .) -}}
{{- end -}}

{{- define "gpuaas.webhookCertificateName" -}}
{{- printf "%s-webhook" (include "gpuaas.fullname" .) -}}
{{- end -}}

{{/* DNS names of the webhook Service, for the serving certificate. */}}
{{- define "gpuaas.webhookDNSNames" -}}
{{- $svc := include "gpuaas.webhookServiceName" . -}}
{{- list $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.cluster.local" $svc .Release.Namespace) | toJson -}}
{{- end -}}

{{- define "gpuaas.operatorUsername" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "gpuaas.serviceAccountName" .) -}}
{{- end -}}

{{- define "gpuaas.reportClaimName" -}}
{{- default (printf "%s-reports" (include "gpuaas.fullname" .)) .Values.report.persistence.existingClaim -}}
{{- end -}}

{{/*
The chart-generated webhook TLS material (webhook.certificate.mode selfSigned), as YAML {ca, crt, key}, each
base64. Reuses the existing Secret (lookup) so that upgrades keep the CA and certificate; generates a new CA
and certificate otherwise (first install, `helm template`). Computed once per render and memoized in .Values,
because genCA is random and the Secret, the caBundle and the pod checksum must agree.
*/}}
{{- define "gpuaas.webhookTLS" -}}
{{- if not (hasKey .Values "gpuaasInternalWebhookTLS") -}}
{{- $tls := dict -}}
{{- $secret := lookup "v1" "Secret" .Release.Namespace (include "gpuaas.webhookSecretName" .) -}}
{{- $data := dict -}}
{{- if $secret -}}{{- $data = default dict $secret.data -}}{{- end -}}
{{- if and (index $data "ca.crt") (index $data "tls.crt") (index $data "tls.key") -}}
{{- $tls = dict "ca" (index $data "ca.crt") "crt" (index $data "tls.crt") "key" (index $data "tls.key") -}}
{{- else -}}
{{- $days := int .Values.webhook.certificate.validityDays -}}
{{- $ca := genCA (printf "%s-webhook-ca" (include "gpuaas.fullname" .)) $days -}}
{{- $dnsNames := include "gpuaas.webhookDNSNames" . | fromJsonArray -}}
{{- $cert := genSignedCert (index $dnsNames 2) nil $dnsNames $days $ca -}}
{{- $tls = dict "ca" ($ca.Cert | b64enc) "crt" ($cert.Cert | b64enc) "key" ($cert.Key | b64enc) -}}
{{- end -}}
{{- $_ := set .Values "gpuaasInternalWebhookTLS" $tls -}}
{{- end -}}
{{- toYaml (get .Values "gpuaasInternalWebhookTLS") -}}
{{- end -}}

{{/* matchConditions that let the listed usernames skip a validating webhook. Argument: list of usernames. */}}
{{- define "gpuaas.exemptUsers" -}}
{{- if . -}}
{{- $quoted := list -}}
{{- range . }}{{ $quoted = append $quoted (printf "'%s'" .) }}{{ end -}}
matchConditions:
  - name: exempt-trusted-users
    expression: {{ printf "!(request.userInfo.username in [%s])" (join ", " $quoted) | quote }}
{{- end -}}
{{- end -}}

{{/* clientConfig of a webhook. Argument: dict root, inCluster, path. */}}
{{- define "gpuaas.webhookClientConfig" -}}
{{- $root := .root -}}
clientConfig:
{{- if .inCluster }}
  service:
    name: {{ include "gpuaas.webhookServiceName" $root }}
    namespace: {{ $root.Release.Namespace }}
    path: {{ .path }}
    port: 443
  {{- if eq $root.Values.webhook.certificate.mode "selfSigned" }}
  caBundle: {{ (include "gpuaas.webhookTLS" $root | fromYaml).ca }}
  {{- end }}
{{- else }}
  url: {{ printf "%s%s" (trimSuffix "/" $root.Values.webhook.external.url) .path | quote }}
  caBundle: {{ $root.Values.webhook.external.caBundle }}
{{- end }}
{{- end -}}

{{/* Settings shared by every webhook. */}}
{{- define "gpuaas.webhookCommon" -}}
# Only managed tenant namespaces: the operator's namespace and kube-system can never be blocked.
namespaceSelector:
  matchLabels:
    gpuaas.io/managed: "true"
matchPolicy: Equivalent
sideEffects: None
admissionReviewVersions: [v1]
timeoutSeconds: {{ .Values.webhook.timeoutSeconds }}
{{- end -}}

{{/*
Fails on Helm 3 for objects applied as hooks with the hook-failed delete policy (the pools):
Helm 3 creates hook objects client-side and would fail on upgrade with "already exists".
Argument: list (root context) (what needs it).
*/}}
{{- define "gpuaas.requireHelm4" -}}
{{- $root := index . 0 -}}
{{- if semverCompare "<4.0.0-0" $root.Capabilities.HelmVersion.Version -}}
{{- fail (printf "%s needs Helm 4, which applies hook objects with server-side apply; Helm %s cannot update them in place" (index . 1) $root.Capabilities.HelmVersion.Version) -}}
{{- end -}}
{{- end -}}
