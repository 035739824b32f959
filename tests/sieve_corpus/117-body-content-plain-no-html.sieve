# envelope: from=alice@example.org to=customer@example.com message=messages/multipart.eml
require ["fileinto", "body"];
if body :content "text/plain" :contains "<b>" {
  fileinto "yes";
} else {
  fileinto "no";
}
