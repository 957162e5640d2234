"""TenantService: tenants, their tokens and quotas (admin tokens only)."""

from __future__ import annotations

from cotune.adapters.registry import UNFINISHED_JOB_STATES, Registry
from cotune.server import convert
from cotune.server.handlers import Gate, rpc
from cotune.server.jobs import JobManager
from cotune.server.sessions import SessionManager
from cotune.v1 import tenants_pb2, tenants_pb2_grpc


class TenantService(tenants_pb2_grpc.TenantServiceServicer):
    def __init__(self, gate: Gate, registry: Registry, jobs: JobManager,
                 sessions: SessionManager):
        self.gate, self.registry, self.jobs, self.sessions = gate, registry, jobs, sessions

    def _tenant(self, name: str) -> tenants_pb2.Tenant:
        return convert.tenant(self.registry.get_tenant(name), self.registry.tokens(name))

    @rpc(admin=True)
    def CreateTenant(self, request, context, caller):
        quotas = convert.quotas(request.quotas, self.registry.default_quotas) \
            if request.HasField("quotas") else None
        self.registry.create_tenant(request.name, request.admin, quotas)
        return self._tenant(request.name)

    @rpc(admin=True)
    def GetTenant(self, request, context, caller):
        return self._tenant(request.name)

    @rpc(admin=True)
    def ListTenants(self, request, context, caller):
        size = convert.page_size(request.page_size)
        records = self.registry.list_tenants(convert.page_after(request.page_token), size)
        return tenants_pb2.ListTenantsResponse(
            tenants=[convert.tenant(r, self.registry.tokens(r.name)) for r in records],
            next_page_token=convert.next_page(records, size, lambda r: r.name))

    @rpc(admin=True)
    def SetQuotas(self, request, context, caller):
        self.registry.set_quotas(request.name, convert.quotas(request.quotas))
        return self._tenant(request.name)

    @rpc(admin=True)
    def DeleteTenant(self, request, context, caller):
        deletion = self.jobs.delete_tenant(request.name)
        self.sessions.forget_tenant(request.name)
        return tenants_pb2.DeleteTenantResponse(
            adapters_deleted=deletion.adapters, versions_deleted=deletion.versions,
            jobs_deleted=len(deletion.jobs), tokens_deleted=deletion.tokens,
            files_deleted=deletion.files,
            jobs_cancelled=sum(j.state in UNFINISHED_JOB_STATES for j in deletion.jobs))

    @rpc(admin=True)
    def IssueToken(self, request, context, caller):
        record, secret = self.registry.issue_token(request.tenant, request.description)
        return tenants_pb2.IssuedToken(id=record.id, token=secret)

    @rpc(admin=True)
    def RevokeToken(self, request, context, caller):
        return tenants_pb2.RevokeTokenResponse(revoked=self.registry.revoke_token(request.id))
