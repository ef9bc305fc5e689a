"""replies and mentions: message.reply_to_msg_id (the message a send answers) and
message.mentions (JSON list of the mentioned members' ids, as strings)

Revision ID: 0016
Revises: 0015
"""
from alembic import op
import sqlalchemy as sa


revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reply_to_msg_id', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('mentions', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_column('mentions')
        batch_op.drop_column('reply_to_msg_id')
